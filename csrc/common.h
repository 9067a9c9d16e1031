// Helpers shared by every op's CPU and CUDA bodies: layout and argument checks, dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>

namespace pyadvk {

// The memory format in which `t` is dense (non-overlapping, batch outermost), if any.
inline std::optional<at::MemoryFormat> dense_format(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return std::nullopt;
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref, at::MemoryFormat format) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(format), op, ": ", name, " must be dense in the memory format of ",
              ref_name, " (the Python wrapper converts it)");
}

inline void check_per_sample(const char* op, const char* name, const std::optional<at::Tensor>& t,
                             const at::Tensor& ref) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == ref.size(0), op, ": ", name, " must have shape (",
              ref.size(0), ",), got ", t->sizes());
  TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ",
              t->device());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

inline const float* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// Calls f(scalar_t{}) for the three supported dtypes (float32, float16, bfloat16); the caller has
// already rejected every other dtype with a message.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", dtype);
  }
}

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

}  // namespace pyadvk
