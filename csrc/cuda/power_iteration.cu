// CUDA body of the batched power iteration (see csrc/power_iteration.h for the tables).
//
// Per iteration, four launches over all matrices at once:
//   1. one block per column task (kColBlock columns, a thread per column, all rows): v = Wᵀu,
//      coalesced row-segment reads, and the block's Σ v² into partial[task];
//   2. one block per matrix: ||v|| from its tasks' partials, v /= ||v|| (0 when ||v|| = 0);
//   3. one block per row task (a warp per row): t[r] = <W[r, :], v>, the block's Σ t²;
//   4. one block per matrix: σ = ||t||, u = t / σ (u unchanged when σ = 0).
// No atomics: results are deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../power_iteration.h"

namespace pyadvk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kColBlock = kThreads;

__device__ __forceinline__ double block_sum(double x) {
  __shared__ double shared[kWarps];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int k = 0; k < kWarps; ++k) total += shared[k];
  return total;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    wt_u_kernel(const int64_t* __restrict__ meta, const int64_t* __restrict__ tasks, double* partial) {
  const int64_t k = blockIdx.x;
  const int64_t* task = tasks + 3 * k;
  const int64_t* r = meta + task[0] * kMetaFields;
  const T* w = reinterpret_cast<const T*>(r[kMetaW]);
  const float* u = reinterpret_cast<const float*>(r[kMetaU]);
  float* v = reinterpret_cast<float*>(r[kMetaV]);
  const int64_t m = r[kMetaRows], n = r[kMetaCols];
  const int64_t c = task[1] + threadIdx.x;
  float acc = 0.f;
  if (c < task[2])
    for (int64_t row = 0; row < m; ++row) acc += u[row] * static_cast<float>(w[row * n + c]);
  if (c < task[2]) v[c] = acc;
  const double total = block_sum(c < task[2] ? static_cast<double>(acc) * acc : 0.0);
  if (threadIdx.x == 0) partial[k] = total;
}

__global__ void __launch_bounds__(kThreads)
    normalize_v_kernel(const int64_t* __restrict__ meta, const double* partial) {
  const int64_t* r = meta + blockIdx.x * kMetaFields;
  __shared__ float norm;
  if (threadIdx.x == 0) {
    double ss = 0;
    for (int64_t k = r[kMetaColTask0]; k < r[kMetaColTask1]; ++k) ss += partial[k];
    norm = static_cast<float>(sqrt(ss));
  }
  __syncthreads();
  float* v = reinterpret_cast<float*>(r[kMetaV]);
  const float nv = norm;
  for (int64_t c = threadIdx.x; c < r[kMetaCols]; c += kThreads) v[c] = nv > 0.f ? v[c] / nv : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    w_v_kernel(const int64_t* __restrict__ meta, const int64_t* __restrict__ tasks, float* t_all,
               double* partial) {
  const int64_t k = blockIdx.x;
  const int64_t* task = tasks + 3 * k;
  const int64_t* r = meta + task[0] * kMetaFields;
  const T* w = reinterpret_cast<const T*>(r[kMetaW]);
  const float* v = reinterpret_cast<const float*>(r[kMetaV]);
  float* t = t_all + r[kMetaT];
  const int64_t n = r[kMetaCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double ss = 0;
  for (int64_t row = task[1] + warp; row < task[2]; row += kWarps) {
    float dot = 0.f;
    for (int64_t c = lane; c < n; c += 32) dot += static_cast<float>(w[row * n + c]) * v[c];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_down_sync(0xffffffffu, dot, o);
    if (lane == 0) {
      t[row] = dot;
      ss += static_cast<double>(dot) * dot;
    }
  }
  const double total = block_sum(ss);
  if (threadIdx.x == 0) partial[k] = total;
}

__global__ void __launch_bounds__(kThreads)
    normalize_u_kernel(const int64_t* __restrict__ meta, const float* t_all, const double* partial,
                       float* sigma) {
  const int64_t* r = meta + blockIdx.x * kMetaFields;
  __shared__ float norm;
  if (threadIdx.x == 0) {
    double ss = 0;
    for (int64_t k = r[kMetaRowTask0]; k < r[kMetaRowTask1]; ++k) ss += partial[k];
    norm = static_cast<float>(sqrt(ss));
    sigma[blockIdx.x] = norm;
  }
  __syncthreads();
  const float nt = norm;
  if (!(nt > 0.f)) return;
  float* u = reinterpret_cast<float*>(r[kMetaU]);
  const float* t = t_all + r[kMetaT];
  for (int64_t row = threadIdx.x; row < r[kMetaRows]; row += kThreads) u[row] = t[row] / nt;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> power_iteration_cuda(
    at::TensorList weights, at::TensorList us, int64_t n_iters) {
  check_power_iteration("power_iteration", at::kCUDA, weights, us, n_iters);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  auto plan = plan_power_iteration(weights, us, kColBlock, 8 * 1024, 64);
  const auto opts = weights[0].options();
  const auto meta = plan.meta.to(weights[0].device());
  const auto col_tasks = plan.col_tasks.to(weights[0].device());
  const auto row_tasks = plan.row_tasks.to(weights[0].device());
  auto t = at::empty({std::max<int64_t>(plan.t_total, 1)}, opts.dtype(at::kFloat));
  auto partial = at::empty({std::max<int64_t>(std::max(plan.n_col_tasks, plan.n_row_tasks), 1)},
                           opts.dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = static_cast<int64_t>(weights.size());
  dispatch_float(weights[0].scalar_type(), "power_iteration", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t it = 0; it < n_iters; ++it) {
      wt_u_kernel<T><<<plan.n_col_tasks, kThreads, 0, stream>>>(
          meta.data_ptr<int64_t>(), col_tasks.data_ptr<int64_t>(), partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      normalize_v_kernel<<<N, kThreads, 0, stream>>>(meta.data_ptr<int64_t>(), partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      w_v_kernel<T><<<plan.n_row_tasks, kThreads, 0, stream>>>(
          meta.data_ptr<int64_t>(), row_tasks.data_ptr<int64_t>(), t.data_ptr<float>(),
          partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      normalize_u_kernel<<<N, kThreads, 0, stream>>>(meta.data_ptr<int64_t>(), t.data_ptr<float>(),
                                                     partial.data_ptr<double>(), plan.sigma.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {plan.sigma, plan.us, plan.vs};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) { m.impl("power_iteration", &power_iteration_cuda); }

}  // namespace pyadvk
