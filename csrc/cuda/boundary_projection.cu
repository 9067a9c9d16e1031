// CUDA body of the boundary projection (the search: csrc/boundary_projection.h; the op and its
// torch reference: pyadvk/ops/boundary_projection.py).
//
// One block per row. Each pass (r = w.x + b; the sums at t = inf and t = 0; one per probe of the
// bisection; the write) strides the block's threads over the row, then combines the threads'
// ProbeSums with block sums in a fixed order (common.cuh) and a block max/min of the two nearest
// breakpoints, so every thread holds the same totals and takes the same branch of the search. All
// arithmetic in double; no atomics: results are deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../boundary_projection.h"
#include "common.cuh"

namespace pyadvk {
namespace {

using namespace cuda;  // common.cuh
using boundary::ProbeSums;

// The block's largest `high` and smallest `low`; every thread gets both.
__device__ __forceinline__ void block_extremes(double& high, double& low) {
  __shared__ double shared[2][kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double h = __shfl_xor_sync(0xffffffffu, high, off), l = __shfl_xor_sync(0xffffffffu, low, off);
    high = h > high ? h : high;
    low = l < low ? l : low;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = high;
    shared[1][warp] = low;
  }
  __syncthreads();
  for (int k = 0; k < kThreads / 32; ++k) {
    high = shared[0][k] > high ? shared[0][k] : high;
    low = shared[1][k] < low ? shared[1][k] : low;
  }
  __syncthreads();  // shared may be reused by a later call
}

// Every thread's ProbeSums combined over the block (in every thread).
__device__ __forceinline__ void block_combine(ProbeSums& p) {
  double sums[4] = {p.A, p.B, p.V, static_cast<double>(p.n)};
  block_sum<4>(sums);
  block_extremes(p.below_max, p.above_min);
  p.A = sums[0];
  p.B = sums[1];
  p.V = sums[2];
  p.n = static_cast<int64_t>(sums[3]);  // exact: a count below 2^53
}

template <typename T>
__device__ __forceinline__ ProbeSums probe_pass(const T* x, const T* w, int64_t D, double s, double lower,
                                                double upper, bool l2, double t) {
  ProbeSums p = ProbeSums::empty();
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    double v, tau;
    if (boundary::breakpoint(static_cast<double>(x[i]), static_cast<double>(w[i]), s, lower, upper, l2, v, tau))
      p.add(t, v, tau);
  }
  block_combine(p);
  return p;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    project_kernel(const T* x, const T* w, const T* b, T* out, int64_t D, double lower, double upper, bool l2) {
  const int64_t row = blockIdx.x;
  x += row * D;
  w += row * D;
  out += row * D;
  double r[1] = {0.0};
  for (int64_t i = threadIdx.x; i < D; i += kThreads) r[0] += static_cast<double>(w[i]) * static_cast<double>(x[i]);
  block_sum<1>(r);
  const double offset = r[0] + static_cast<double>(b[row]);
  const double s = offset > 0 ? -1.0 : 1.0;
  const double r_abs = offset < 0 ? -offset : offset;  // NaN stays NaN
  boundary::BoundarySearch search;
  if (r_abs != r_abs) {
    search.start(r_abs, ProbeSums::empty(), ProbeSums::empty());
  } else {
    const ProbeSums at_inf = probe_pass(x, w, D, s, lower, upper, l2, __builtin_huge_val());
    const ProbeSums at_zero = probe_pass(x, w, D, s, lower, upper, l2, 0.0);
    search.start(r_abs, at_inf, at_zero);
    while (!search.done) {
      const double t = search.probe();
      search.update(t, probe_pass(x, w, D, s, lower, upper, l2, t));
    }
  }
  const double tau = search.tau();
  for (int64_t i = threadIdx.x; i < D; i += kThreads)
    out[i] = static_cast<T>(
        boundary::delta_at(static_cast<double>(x[i]), static_cast<double>(w[i]), s, lower, upper, l2, tau));
}

at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double lower, double upper,
                   c10::string_view norm) {
  check_boundary_projection("boundary_projection", at::kCUDA, x, w, b, lower, upper, norm);
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = x.size(0), D = x.size(1);
  const bool l2 = norm == "l2";
  if (x.scalar_type() == at::kFloat) {
    project_kernel<float><<<R, kThreads, 0, stream>>>(x.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(),
                                                      out.data_ptr<float>(), D, lower, upper, l2);
  } else {
    project_kernel<double><<<R, kThreads, 0, stream>>>(x.data_ptr<double>(), w.data_ptr<double>(),
                                                       b.data_ptr<double>(), out.data_ptr<double>(), D, lower,
                                                       upper, l2);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) { m.impl("boundary_projection", &project); }

}  // namespace pyadvk
