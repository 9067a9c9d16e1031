// CUDA bodies of the fused APGD step (formulas: csrc/apgd.h and pyadvk/ops/apgd.py).
//
// Each block owns one tile of kTile values that never crosses a sample boundary, so per-sample
// eta/eps are read once per block. linf is one kernel (4 reads + 1 write per value). l2 is four,
// each writing per-tile partial sums in double that the later ones combine per sample: |g|^2;
// |d1|^2 of z's float offset d1 = x + eta g/|g| - x_orig (summed from d1 itself, as the torch body);
// |w - x_orig|^2 of the momentum point w; then the write. Blocks combine
// partials in one fixed order, so the factors are the same in every block and every run (no
// atomics). Loads and stores are 16-byte vectors when every pointer is aligned and D is a multiple
// of the width. min/max/clamp propagate NaN as torch.minimum/maximum/clamp do (common.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../apgd.h"
#include "common.cuh"

namespace pyadvk {
namespace {

using namespace cuda;  // common.cuh

struct Params {
  const float* eta_t;
  float eta;
  const float* eps_t;
  double eps;
  float momentum, rest, lo, hi;
};

__device__ __forceinline__ float eta_of(const Params& p, int64_t b) { return p.eta_t ? p.eta_t[b] : p.eta; }
__device__ __forceinline__ double eps_of(const Params& p, int64_t b) {
  return p.eps_t ? static_cast<double>(p.eps_t[b]) : p.eps;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    linf_kernel(const T* x, const T* xp, const T* xo, const T* g, T* out, int64_t D, int64_t per_sample, Params p) {
  const TileInfo t = tile_info(D, per_sample);
  const float h = eta_of(p, t.b), e = static_cast<float>(eps_of(p, t.b));
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float vx[VEC], vp[VEC], vo[VEC], vg[VEC], y[VEC];
    load_pack<VEC>(x + t.base + i, vx);
    load_pack<VEC>(xp + t.base + i, vp);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float sign = vg[k] > 0.f ? 1.f : (vg[k] < 0.f ? -1.f : 0.f);  // NaN: 0
      const float below = vo[k] - e, above = vo[k] + e;
      const float z = clamp_nan(min_nan(max_nan(vx[k] + h * sign, below), above), p.lo, p.hi);
      const float w = (vx[k] + p.momentum * (z - vx[k])) + p.rest * (vx[k] - vp[k]);
      y[k] = clamp_nan(min_nan(max_nan(w, below), above), p.lo, p.hi);
    }
    store_pack<VEC>(out + t.base + i, y);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) l2_gg_kernel(const T* g, double* gg, int64_t D, int64_t per_sample) {
  tile_square_norm<T, VEC>(g, gg, tile_info(D, per_sample));
}

// z's float offset d1 = x + eta g/|g| - x_orig at one value, as the torch body (unit_step:
// common.cuh).
__device__ __forceinline__ float first_offset(float x, float o, float g, double inv, float h) {
  return (x + h * unit_step(g, inv)) - o;
}

// This block's tile sum of |d1|^2 (double) from the float d1.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    l2_d1_kernel(const T* x, const T* xo, const T* g, const double* gg, double* dd1, int64_t D, int64_t per_sample,
                 Params p) {
  const TileInfo t = tile_info(D, per_sample);
  const double inv = inverse_norm(sample_total(gg, t.b, per_sample));
  const float h = eta_of(p, t.b);
  double s[1] = {0.0};
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float vx[VEC], vo[VEC], vg[VEC];
    load_pack<VEC>(x + t.base + i, vx);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double d1 = first_offset(vx[k], vo[k], vg[k], inv, h);
      s[0] += d1 * d1;
    }
  }
  block_sum<1>(s);
  if (threadIdx.x == 0) dd1[blockIdx.x] = s[0];
}

// 1/|g| (double; 0 when |g| = 0) and z's projection factor of this block's sample (1 for a NaN
// norm or an infinite |g|, as the torch body's NaN norm).
struct First {
  double inv;
  float f1;
};

__device__ __forceinline__ First first_scalars(const double* gg, const double* dd1, int64_t b, int64_t per_sample,
                                               double eps) {
  const double g2 = sample_total(gg, b, per_sample);
  const double dn = sqrt(sample_total(dd1, b, per_sample));
  return {inverse_norm(g2), (dn > eps && !isinf(g2)) ? static_cast<float>(eps / dn) : 1.f};
}

__device__ __forceinline__ float momentum_point(float x, float xp, float o, float g, const First& f, float h,
                                                const Params& p) {
  const float z = clamp_nan(o + first_offset(x, o, g, f.inv, h) * f.f1, p.lo, p.hi);
  return (x + p.momentum * (z - x)) + p.rest * (x - xp);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    l2_second_kernel(const T* x, const T* xp, const T* xo, const T* g, const double* gg, const double* dd1,
                     double* partial2, int64_t D, int64_t per_sample, Params p) {
  const TileInfo t = tile_info(D, per_sample);
  const float h = eta_of(p, t.b);
  const First f = first_scalars(gg, dd1, t.b, per_sample, eps_of(p, t.b));
  double s[1] = {0.0};
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float vx[VEC], vp[VEC], vo[VEC], vg[VEC];
    load_pack<VEC>(x + t.base + i, vx);
    load_pack<VEC>(xp + t.base + i, vp);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double d2 = momentum_point(vx[k], vp[k], vo[k], vg[k], f, h, p) - vo[k];
      s[0] += d2 * d2;
    }
  }
  block_sum<1>(s);
  if (threadIdx.x == 0) partial2[blockIdx.x] = s[0];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    l2_write_kernel(const T* x, const T* xp, const T* xo, const T* g, T* out, const double* gg, const double* dd1,
                    const double* partial2, int64_t D, int64_t per_sample, Params p) {
  const TileInfo t = tile_info(D, per_sample);
  const float h = eta_of(p, t.b);
  const double eps = eps_of(p, t.b);
  const First f = first_scalars(gg, dd1, t.b, per_sample, eps);
  const double dn = sqrt(sample_total(partial2, t.b, per_sample));
  const float f2 = dn > eps ? static_cast<float>(eps / dn) : 1.f;  // NaN: 1
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float vx[VEC], vp[VEC], vo[VEC], vg[VEC], y[VEC];
    load_pack<VEC>(x + t.base + i, vx);
    load_pack<VEC>(xp + t.base + i, vp);
    load_pack<VEC>(xo + t.base + i, vo);
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d2 = momentum_point(vx[k], vp[k], vo[k], vg[k], f, h, p) - vo[k];
      y[k] = clamp_nan(vo[k] + d2 * f2, p.lo, p.hi);
    }
    store_pack<VEC>(out + t.base + i, y);  // in place: out is x_prev, read above for these values only
  }
}

void run_step(Norm norm, const char* op, const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x_orig,
              const at::Tensor& grad, double eta, const std::optional<at::Tensor>& eta_t, double eps,
              const std::optional<at::Tensor>& eps_t, double momentum, double lower, double upper, at::Tensor& out) {
  check_apgd_step(op, at::kCUDA, x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.numel() / B;
  const int64_t per_sample = (D + kTile - 1) / kTile;
  TORCH_CHECK(B * per_sample <= INT32_MAX, op, ": tensor too large for one launch (", x.numel(), " values)");
  const dim3 grid(static_cast<unsigned>(B * per_sample));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Params p{optional_data(eta_t),      static_cast<float>(eta),          optional_data(eps_t),
                 eps,                       static_cast<float>(momentum),     static_cast<float>(1.0 - momentum),
                 static_cast<float>(lower), static_cast<float>(upper)};
  at::Tensor partials;  // per-tile |g|^2, |d1|^2, |w - x_orig|^2: one allocation per step
  if (norm == Norm::L2) partials = at::empty({3, B * per_sample}, x.options().dtype(at::kDouble));
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *px = x.data_ptr<T>(), *pp = x_prev.data_ptr<T>(), *po = x_orig.data_ptr<T>(), *pg = grad.data_ptr<T>();
    T* py = out.data_ptr<T>();
    with_vector_width<T>(D, {px, pp, po, pg, py}, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      if (norm == Norm::Linf) {
        linf_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(px, pp, po, pg, py, D, per_sample, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      double* pgg = partials.data_ptr<double>();
      double *pdd1 = pgg + B * per_sample, *part2 = pdd1 + B * per_sample;
      l2_gg_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(pg, pgg, D, per_sample);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      l2_d1_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(px, po, pg, pgg, pdd1, D, per_sample, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      l2_second_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(px, pp, po, pg, pgg, pdd1, part2, D, per_sample, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      l2_write_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(px, pp, po, pg, py, pgg, pdd1, part2, D, per_sample, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

constexpr const char* op_name(Norm norm, bool inplace) {
  return norm == Norm::Linf ? (inplace ? "apgd_step_linf_" : "apgd_step_linf")
                            : (inplace ? "apgd_step_l2_" : "apgd_step_l2");
}

template <Norm N>
at::Tensor step(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x_orig, const at::Tensor& grad,
                double eta, const std::optional<at::Tensor>& eta_t, double eps,
                const std::optional<at::Tensor>& eps_t, double momentum, double lower, double upper) {
  auto out = at::empty_like(x);
  run_step(N, op_name(N, false), x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper, out);
  return out;
}

template <Norm N>
void step_(const at::Tensor& x, at::Tensor& x_prev, const at::Tensor& x_orig, const at::Tensor& grad, double eta,
           const std::optional<at::Tensor>& eta_t, double eps, const std::optional<at::Tensor>& eps_t,
           double momentum, double lower, double upper) {
  run_step(N, op_name(N, true), x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper, x_prev);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) {
  m.impl("apgd_step_linf", &step<Norm::Linf>);
  m.impl("apgd_step_linf_", &step_<Norm::Linf>);
  m.impl("apgd_step_l2", &step<Norm::L2>);
  m.impl("apgd_step_l2_", &step_<Norm::L2>);
}

}  // namespace pyadvk
