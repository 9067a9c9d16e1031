// Shared declarations and argument checks for the Half-Huber ReLU ops (CPU and CUDA bodies).
//
// The ops (schemas and the definition in pyadvk/ops/half_huber.py) are elementwise: every operand
// has x's dtype, shape and strides, x is non-overlapping and dense (contiguous, channels_last or
// any other dense permutation), so the kernels walk numel values in memory order. Arithmetic is
// float32 for float32/float16/bfloat16 and float64 for float64; the constants come from the host in
// double and are rounded to the compute type, exactly as the torch reference does.
#pragma once

#include <cmath>
#include <initializer_list>
#include <utility>

#include "common.h"

namespace pyadvk {

enum class HalfHuberOp { Forward, Backward, DoubleBackward };

// The constants of f for one delta, in the compute type C (float or double).
template <typename C>
struct HalfHuberConsts {
  C delta;  // delta
  C half;   // delta / 2
  C invd;   // 1 / delta
  C inv2d;  // 1 / (2 delta)
};

// One call of a Half-Huber op as the CPU kernels (csrc/cpu/half_huber_kernels.inc) see it.
//   Forward:        out = f(x)
//   Backward:       out = grad * f'(x)
//   DoubleBackward: out = gg * f'(x), out2 = gg * grad * f''(x)
struct HalfHuberArgs {
  HalfHuberOp op;
  at::ScalarType dtype;
  const void* x;
  const void* grad;  // Backward, DoubleBackward
  const void* gg;    // DoubleBackward
  void* out;
  void* out2;  // DoubleBackward
  int64_t n;
  double delta;
};

inline bool half_huber_dtype(at::ScalarType dtype) {
  return is_supported_float(dtype) || dtype == at::kDouble;
}

// Same shape and the same stride on every dim of size > 1.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

inline void check_half_huber(const char* op, at::DeviceType device, const at::Tensor& x, double delta,
                             std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  TORCH_CHECK(half_huber_dtype(x.scalar_type()), op,
              ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), op,
              ": x must be non-overlapping and dense (contiguous, channels_last, ...), got strides ",
              x.strides());
  TORCH_CHECK(delta > 0 && std::isfinite(delta), op, ": delta must be finite and > 0, got ", delta);
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
                x.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(same_layout(*t, x), op, ": ", name, " must have the shape ", x.sizes(),
                " and strides ", x.strides(), " of x, got shape ", t->sizes(), " and strides ",
                t->strides(), " (the Python wrapper converts it)");
  }
}

}  // namespace pyadvk
