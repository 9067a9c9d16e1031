// CUDA bodies of the Half-Huber ReLU ops.
//
// Elementwise over numel values in memory order (every operand shares x's dense layout): a
// grid-stride loop, each thread handling VEC consecutive values with one 16-byte (or narrower)
// load per operand when every pointer is aligned and numel is a multiple of VEC; otherwise VEC = 1.
// The formulas and their order are those of pyadvk/ops/half_huber.py (float32 arithmetic; float64
// for float64 tensors). No atomics: results are deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../half_huber.h"
#include "common.cuh"

namespace pyadvk {
namespace {

using namespace cuda;  // common.cuh

template <typename C>
HalfHuberConsts<C> consts(double delta) {
  return {static_cast<C>(delta), static_cast<C>(delta / 2.0), static_cast<C>(1.0 / delta),
          static_cast<C>(1.0 / (2.0 * delta))};
}

// __fmul_rn keeps the compiler from contracting products into fused multiply-adds.
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }

template <typename C>
__device__ __forceinline__ C value(C v, HalfHuberConsts<C> k) {
  return v >= k.delta ? v - k.half : (v <= C(0) ? C(0) : mul(mul(v, v), k.inv2d));
}

template <typename C>
__device__ __forceinline__ C slope_times(C g, C v, HalfHuberConsts<C> k) {
  return v >= k.delta ? g : (v <= C(0) ? C(0) : mul(g, mul(v, k.invd)));
}

template <typename C>
__device__ __forceinline__ C curvature_times(C gg, C g, C v, HalfHuberConsts<C> k) {
  return (v > C(0) && v < k.delta) ? mul(mul(gg, g), k.invd) : C(0);
}

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* x, T* y, int64_t n, HalfHuberConsts<C> k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; i < n; i += stride) {
    C v[VEC], out[VEC];
    load_pack<VEC>(x + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = value(v[j], k);
    store_pack<VEC>(y + i, out);
  }
}

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* g, const T* x, T* out, int64_t n, HalfHuberConsts<C> k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; i < n; i += stride) {
    C v[VEC], gv[VEC], o[VEC];
    load_pack<VEC>(x + i, v);
    load_pack<VEC>(g + i, gv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = slope_times(gv[j], v[j], k);
    store_pack<VEC>(out + i, o);
  }
}

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kThreads)
    double_backward_kernel(const T* gg, const T* g, const T* x, T* d_grad, T* d_x, int64_t n,
                           HalfHuberConsts<C> k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; i < n; i += stride) {
    C v[VEC], gv[VEC], ggv[VEC], a[VEC], b[VEC];
    load_pack<VEC>(x + i, v);
    load_pack<VEC>(g + i, gv);
    load_pack<VEC>(gg + i, ggv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      a[j] = slope_times(ggv[j], v[j], k);
      b[j] = curvature_times(ggv[j], gv[j], v[j], k);
    }
    store_pack<VEC>(d_grad + i, a);
    store_pack<VEC>(d_x + i, b);
  }
}

int64_t blocks_for(int64_t n, int vec) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  return std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, 65535 * 8));
}

template <typename F>
void dispatch_types(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    default: TORCH_CHECK(false, "half_huber_relu: unsupported dtype ", dtype);
  }
}

at::Tensor forward(const at::Tensor& x, double delta) {
  check_half_huber("half_huber_relu", at::kCUDA, x, delta, {});
  auto y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    const T* px = static_cast<const T*>(x.data_ptr());
    T* py = static_cast<T*>(y.data_ptr());
    with_vector_width<T>(n, {px, py}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      forward_kernel<T, C, V><<<blocks_for(n, V), kThreads, 0, stream>>>(px, py, n, consts<C>(delta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, double delta) {
  check_half_huber("half_huber_relu_backward", at::kCUDA, x, delta, {{"grad", &grad}});
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    const T* px = static_cast<const T*>(x.data_ptr());
    const T* pg = static_cast<const T*>(grad.data_ptr());
    T* po = static_cast<T*>(out.data_ptr());
    with_vector_width<T>(n, {px, pg, po}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      backward_kernel<T, C, V><<<blocks_for(n, V), kThreads, 0, stream>>>(pg, px, po, n, consts<C>(delta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> double_backward(const at::Tensor& gg, const at::Tensor& grad,
                                                   const at::Tensor& x, double delta) {
  check_half_huber("half_huber_relu_double_backward", at::kCUDA, x, delta, {{"gg", &gg}, {"grad", &grad}});
  auto d_grad = at::empty_like(x);
  auto d_x = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {d_grad, d_x};
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    const T* px = static_cast<const T*>(x.data_ptr());
    const T* pg = static_cast<const T*>(grad.data_ptr());
    const T* pgg = static_cast<const T*>(gg.data_ptr());
    T* pa = static_cast<T*>(d_grad.data_ptr());
    T* pb = static_cast<T*>(d_x.data_ptr());
    with_vector_width<T>(n, {px, pg, pgg, pa, pb}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      double_backward_kernel<T, C, V>
          <<<blocks_for(n, V), kThreads, 0, stream>>>(pgg, pg, px, pa, pb, n, consts<C>(delta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {d_grad, d_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) {
  m.impl("half_huber_relu", &forward);
  m.impl("half_huber_relu_backward", &backward);
  m.impl("half_huber_relu_double_backward", &double_backward);
}

}  // namespace pyadvk
