// CUDA bodies of the fused PGD ops.
//
// Each block owns one tile of kTile values that never crosses a sample boundary, so per-sample
// eps/alpha are read once per block. linf is one kernel (3 reads + 1 write per value). l2 is three,
// the later ones combining the earlier ones' per-tile partial sums per sample: |g|^2; |d|^2 of the
// float d that the write computes (as the torch body: an expansion of |d|^2 in first-pass sums
// would cancel where the step is much larger than d); the write (7 reads + 1 write per value). Loads
// and stores are 16-byte vectors when every pointer is aligned and D is a multiple of the width.
// No atomics: results are deterministic. min/max/clamp propagate NaN as torch.minimum/maximum/clamp
// do (common.cuh; fminf/fmaxf would drop it).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../pgd.h"
#include "common.cuh"

namespace pyadvk {
namespace {

using namespace cuda;  // common.cuh

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    linf_step_kernel(const T* xa, const T* xo, const T* g, T* out, int64_t D, int64_t per_sample,
                     const float* eps_t, float eps, const float* alpha_t, float alpha, float lo, float hi) {
  const TileInfo t = tile_info(D, per_sample);
  const float e = eps_t ? eps_t[t.b] : eps;
  const float a = alpha_t ? alpha_t[t.b] : alpha;
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float va[VEC], vo[VEC], vg[VEC], y[VEC];
    load_pack<VEC>(xa + t.base + i, va);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float step = vg[k] > 0.f ? a : (vg[k] < 0.f ? -a : 0.f);  // NaN -> no step
      y[k] = clamp_nan(min_nan(max_nan(va[k] + step, vo[k] - e), vo[k] + e), lo, hi);
    }
    store_pack<VEC>(out + t.base + i, y);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) l2_gg_kernel(const T* g, double* gg, int64_t D, int64_t per_sample) {
  tile_square_norm<T, VEC>(g, gg, tile_info(D, per_sample));
}

// d = x_adv + alpha u - x_orig in float, u = g/|g| as unit_step (common.cuh), as the torch body.
__device__ __forceinline__ float l2_direction(float xa, float xo, float g, float a, double inv) {
  return (xa + a * unit_step(g, inv)) - xo;
}

// This block's tile sum of |d|^2 (double) from the float d that the write computes.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    l2_dd_kernel(const T* xa, const T* xo, const T* g, const double* gg, double* dd, int64_t D, int64_t per_sample,
                 const float* alpha_t, float alpha) {
  const TileInfo t = tile_info(D, per_sample);
  const double inv = inverse_norm(sample_total(gg, t.b, per_sample));
  const float a = alpha_t ? alpha_t[t.b] : alpha;
  double s[1] = {0.0};
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float va[VEC], vo[VEC], vg[VEC];
    load_pack<VEC>(xa + t.base + i, va);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double d = l2_direction(va[k], vo[k], vg[k], a, inv);
      s[0] += d * d;
    }
  }
  block_sum<1>(s);
  if (threadIdx.x == 0) dd[blockIdx.x] = s[0];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    l2_apply_kernel(const T* xa, const T* xo, const T* g, T* out, const double* gg, const double* dd, int64_t D,
                    int64_t per_sample, const float* eps_t, float eps, const float* alpha_t, float alpha, float lo,
                    float hi) {
  const TileInfo t = tile_info(D, per_sample);
  const double inv = inverse_norm(sample_total(gg, t.b, per_sample));
  const double dn = sqrt(sample_total(dd, t.b, per_sample));
  const float e = eps_t ? eps_t[t.b] : eps;
  const float f = dn > e ? static_cast<float>(e / dn) : 1.f;  // NaN: 1 (no projection)
  const float a = alpha_t ? alpha_t[t.b] : alpha;
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float va[VEC], vo[VEC], vg[VEC], y[VEC];
    load_pack<VEC>(xa + t.base + i, va);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) y[k] = clamp_nan(vo[k] + l2_direction(va[k], vo[k], vg[k], a, inv) * f, lo, hi);
    store_pack<VEC>(out + t.base + i, y);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    linf_init_kernel(const T* x, const float* u, T* out, int64_t D, int64_t per_sample,
                     const float* eps_t, float eps, float lo, float hi) {
  const TileInfo t = tile_info(D, per_sample);
  const float e = eps_t ? eps_t[t.b] : eps;
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float vx[VEC], vu[VEC], y[VEC];
    load_pack<VEC>(x + t.base + i, vx);
    load_pack<VEC>(u + t.base + i, vu);
#pragma unroll
    for (int k = 0; k < VEC; ++k) y[k] = clamp_nan(vx[k] + e * (2.f * vu[k] - 1.f), lo, hi);
    store_pack<VEC>(out + t.base + i, y);
  }
}

struct Launch {
  int64_t D, per_sample;
  dim3 grid;
  cudaStream_t stream;
};

Launch plan(const at::Tensor& x) {
  const int64_t B = x.size(0), D = x.numel() / B;
  const int64_t per_sample = (D + kTile - 1) / kTile;
  TORCH_CHECK(B * per_sample <= INT32_MAX, "pyadvk: tensor too large for one launch (", x.numel(), " values)");
  return {D, per_sample, dim3(static_cast<unsigned>(B * per_sample)), c10::cuda::getCurrentCUDAStream()};
}

void run_step(Norm norm, const char* op, const at::Tensor& x_adv, const at::Tensor& x_orig,
              const at::Tensor& grad, double eps, double alpha, const std::optional<at::Tensor>& eps_t,
              const std::optional<at::Tensor>& alpha_t, double lower, double upper, at::Tensor& out) {
  check_step(op, at::kCUDA, x_adv, x_orig, grad, eps, alpha, eps_t, alpha_t, lower, upper);
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const Launch L = plan(x_adv);
  const float *et = optional_data(eps_t), *at_ = optional_data(alpha_t);
  const float e = static_cast<float>(eps), a = static_cast<float>(alpha);
  const float lo = static_cast<float>(lower), hi = static_cast<float>(upper);
  at::Tensor partials;  // per-tile |g|^2, then per-tile |d|^2: one allocation per step
  if (norm == Norm::L2) partials = at::empty({2, static_cast<int64_t>(L.grid.x)}, x_adv.options().dtype(at::kDouble));
  dispatch_float(x_adv.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *pa = x_adv.data_ptr<T>(), *po = x_orig.data_ptr<T>(), *pg = grad.data_ptr<T>();
    T* py = out.data_ptr<T>();
    with_vector_width<T>(L.D, {pa, po, pg, py}, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      if (norm == Norm::Linf) {
        linf_step_kernel<T, VEC><<<L.grid, kThreads, 0, L.stream>>>(pa, po, pg, py, L.D, L.per_sample, et, e,
                                                                    at_, a, lo, hi);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        double* pgg = partials.data_ptr<double>();
        double* pdd = pgg + L.grid.x;
        l2_gg_kernel<T, VEC><<<L.grid, kThreads, 0, L.stream>>>(pg, pgg, L.D, L.per_sample);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        l2_dd_kernel<T, VEC><<<L.grid, kThreads, 0, L.stream>>>(pa, po, pg, pgg, pdd, L.D, L.per_sample, at_, a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        l2_apply_kernel<T, VEC><<<L.grid, kThreads, 0, L.stream>>>(pa, po, pg, py, pgg, pdd, L.D, L.per_sample, et,
                                                                   e, at_, a, lo, hi);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

template <Norm N>
at::Tensor step(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, double eps,
                double alpha, const std::optional<at::Tensor>& eps_t,
                const std::optional<at::Tensor>& alpha_t, double lower, double upper) {
  auto out = at::empty_like(x_adv);
  run_step(N, N == Norm::Linf ? "pgd_step_linf" : "pgd_step_l2", x_adv, x_orig, grad, eps, alpha, eps_t,
           alpha_t, lower, upper, out);
  return out;
}

template <Norm N>
void step_(at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, double eps, double alpha,
           const std::optional<at::Tensor>& eps_t, const std::optional<at::Tensor>& alpha_t,
           double lower, double upper) {
  run_step(N, N == Norm::Linf ? "pgd_step_linf_" : "pgd_step_l2_", x_adv, x_orig, grad, eps, alpha,
           eps_t, alpha_t, lower, upper, x_adv);
}

at::Tensor random_init_linf(const at::Tensor& x, const at::Tensor& noise, double eps,
                            const std::optional<at::Tensor>& eps_t, double lower, double upper) {
  check_init("random_init_linf", at::kCUDA, x, noise, eps, eps_t, lower, upper);
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const Launch L = plan(x);
  dispatch_float(x.scalar_type(), "random_init_linf", [&](auto tag) {
    using T = decltype(tag);
    const T* px = x.data_ptr<T>();
    const float* pu = noise.data_ptr<float>();
    T* py = out.data_ptr<T>();
    constexpr int W = 16 / sizeof(T);
    // The noise is float32: a vector of W values spans 4*W bytes.
    const bool vec = L.D % W == 0 && aligned(px, 16) && aligned(py, 16) && aligned(pu, 4 * W);
    if (vec) {
      linf_init_kernel<T, W><<<L.grid, kThreads, 0, L.stream>>>(px, pu, py, L.D, L.per_sample,
                                                                optional_data(eps_t), static_cast<float>(eps),
                                                                static_cast<float>(lower),
                                                                static_cast<float>(upper));
    } else {
      linf_init_kernel<T, 1><<<L.grid, kThreads, 0, L.stream>>>(px, pu, py, L.D, L.per_sample,
                                                                optional_data(eps_t), static_cast<float>(eps),
                                                                static_cast<float>(lower),
                                                                static_cast<float>(upper));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) {
  m.impl("pgd_step_linf", &step<Norm::Linf>);
  m.impl("pgd_step_linf_", &step_<Norm::Linf>);
  m.impl("pgd_step_l2", &step<Norm::L2>);
  m.impl("pgd_step_l2_", &step_<Norm::L2>);
  m.impl("random_init_linf", &random_init_linf);
}

}  // namespace pyadvk
