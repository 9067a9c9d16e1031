// CUDA bodies of the fused PGD ops.
//
// Each block owns one tile of kTile values that never crosses a sample boundary, so per-sample
// eps/alpha are read once per block. linf is one kernel (3 reads + 1 write per value). l2 is two:
// a reduction that writes per-tile partial sums (|g|^2, |x_adv - x_orig|^2, <x_adv - x_orig, g>),
// then an elementwise kernel whose blocks first combine their sample's partials; |d| follows from
// the three sums, so no second reduction over d is needed (6 reads + 1 write per value). Loads
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
__global__ void __launch_bounds__(kThreads)
    l2_reduce_kernel(const T* xa, const T* xo, const T* g, double* partial, int64_t D, int64_t per_sample) {
  // Sums in double: float squares of gradients beyond ~1e19 overflow and below ~1e-19 underflow.
  const TileInfo t = tile_info(D, per_sample);
  double s[3] = {0.0, 0.0, 0.0};  // gg, pp, pg
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float va[VEC], vo[VEC], vg[VEC];
    load_pack<VEC>(xa + t.base + i, va);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double gk = isnan(vg[k]) ? 0.0 : static_cast<double>(vg[k]);
      const double p = static_cast<double>(va[k] - vo[k]);
      s[0] += gk * gk;
      s[1] += p * p;
      s[2] += p * gk;
    }
  }
  block_sum<3>(s);
  if (threadIdx.x == 0) {
    double* dst = partial + 3 * static_cast<int64_t>(blockIdx.x);
    dst[0] = s[0];
    dst[1] = s[1];
    dst[2] = s[2];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    l2_apply_kernel(const T* xa, const T* xo, const T* g, T* out, const double* partial, int64_t D,
                    int64_t per_sample, const float* eps_t, float eps, const float* alpha_t, float alpha,
                    float lo, float hi) {
  const TileInfo t = tile_info(D, per_sample);
  double sums[3] = {0.0, 0.0, 0.0};  // gg, pp, pg
  for (int64_t c = threadIdx.x; c < per_sample; c += kThreads) {
    const double* src = partial + 3 * (t.b * per_sample + c);
    sums[0] += src[0];
    sums[1] += src[1];
    sums[2] += src[2];
  }
  block_sum<3>(sums);
  const double gg = sums[0], pp = sums[1], pg = sums[2];
  const float e = eps_t ? eps_t[t.b] : eps;
  const float gn = static_cast<float>(sqrt(gg));
  const float a = gn > 0.f ? (alpha_t ? alpha_t[t.b] : alpha) : 0.f;
  const float gdiv = gn > 0.f ? gn : 1.f;
  // |d|^2 = pp + 2 s pg + s^2 gg with s = alpha / |g| (see the file comment).
  const double s = static_cast<double>(a) / gdiv;
  const double dd = expanded_square_norm(pp, pg, gg, s);
  const double dn = sqrt(dd > 0.0 ? dd : 0.0);  // NaN: 0, so f = 1 (no projection)
  const float f = dn > e ? static_cast<float>(e / dn) : 1.f;
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float va[VEC], vo[VEC], vg[VEC], y[VEC];
    load_pack<VEC>(xa + t.base + i, va);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gk = isnan(vg[k]) ? 0.f : vg[k];
      const float d = (va[k] + a * (gk / gdiv)) - vo[k];
      y[k] = clamp_nan(vo[k] + d * f, lo, hi);
    }
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
  at::Tensor partial;
  if (norm == Norm::L2) {
    partial = at::empty({static_cast<int64_t>(L.grid.x) * 3}, x_adv.options().dtype(at::kDouble));
  }
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
        double* part = partial.data_ptr<double>();
        l2_reduce_kernel<T, VEC><<<L.grid, kThreads, 0, L.stream>>>(pa, po, pg, part, L.D, L.per_sample);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        l2_apply_kernel<T, VEC><<<L.grid, kThreads, 0, L.stream>>>(pa, po, pg, py, part, L.D, L.per_sample,
                                                                   et, e, at_, a, lo, hi);
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
