// Shared declarations and argument checks for the fused PGD ops (CPU and CUDA bodies).
//
// The ops (schemas declared in pyadvk/ops/pgd.py) see every tensor as a (B, D) matrix: B samples
// along dim 0, D = numel / B values each, in memory order. That view is valid for contiguous and
// channels_last tensors alike, as long as x_adv, x_orig and grad share one memory format (the
// Python wrapper converts them); per-sample eps / alpha are float32 tensors of shape (B,).
#pragma once

#include "common.h"

namespace pyadvk {

enum class Norm { Linf, L2 };

// CPU bodies split the work into tiles of at most kCpuTile values inside one sample.
constexpr int64_t kCpuTile = 16384;

inline int64_t cpu_tiles(int64_t B, int64_t D) { return B * ((D + kCpuTile - 1) / kCpuTile); }

// The cpp l2 step reduces and writes a sample in one go, on one thread, when its three inputs fit
// in kL2ResidentBytes (an ImageNet image in fp32 is 1.8 MB), so the later passes read it back
// from that core's L2 (1-2 MiB on current x86 server cores) instead of from memory; measured on a
// 2-core Xeon VM, 2 MiB L2 per core, this took the ImageNet-size l2 step from 5.2 to 3.9 ms (linf:
// 2.8; figures from before the step's second reduction). Larger samples, or fewer samples than
// threads, take phases over tiles (which also balance threads over tiles) and need the workspace
// of PgdStepArgs.
constexpr int64_t kL2ResidentBytes = 2 * 1024 * 1024;

inline bool l2_sample_at_a_time(int64_t B, int64_t D, int64_t item_size, int64_t threads) {
  return 3 * D * item_size <= kL2ResidentBytes && B >= threads;
}

// Arguments of one PGD step as the CPU kernels (csrc/cpu/pgd_kernels.inc) see them.
struct PgdStepArgs {
  Norm norm;
  at::ScalarType dtype;
  const void* x_adv;
  const void* x_orig;
  const void* grad;
  void* out;  // may equal x_adv (in-place)
  int64_t B, D;
  const float* eps_t;  // per-sample eps, or nullptr to use eps
  float eps;
  const float* alpha_t;
  float alpha;
  float lower, upper;
  double* partial;       // l2 in phases: 2 * cpu_tiles(B, D) doubles of workspace, else null
  double* sample_scalars;  // l2 in phases: 2 * B doubles (1/|g|, factor) of workspace, else null
};

struct LinfInitArgs {
  at::ScalarType dtype;
  const void* x;
  const float* noise;
  void* out;
  int64_t B, D;
  const float* eps_t;
  float eps;
  float lower, upper;
};

// Checks every argument of a PGD step and returns the common memory format.
inline at::MemoryFormat check_step(const char* op, at::DeviceType device, const at::Tensor& x_adv,
                                   const at::Tensor& x_orig, const at::Tensor& grad, double eps,
                                   double alpha, const std::optional<at::Tensor>& eps_t,
                                   const std::optional<at::Tensor>& alpha_t, double lower, double upper) {
  TORCH_CHECK(x_adv.device().type() == device, op, ": x_adv must be a ", device, " tensor, got ",
              x_adv.device());
  const auto dtype = x_adv.scalar_type();
  TORCH_CHECK(is_supported_float(dtype), op,
              ": x_adv must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x_adv.dim() >= 1, op, ": x_adv must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(x_orig.scalar_type() == dtype && grad.scalar_type() == dtype, op,
              ": x_orig and grad must have the dtype of x_adv (", dtype, "), got ", x_orig.scalar_type(),
              " and ", grad.scalar_type());
  const auto format = dense_format(x_adv);
  TORCH_CHECK(format.has_value(), op, ": x_adv must be contiguous or channels_last");
  check_like(op, "x_orig", x_orig, "x_adv", x_adv, *format);
  check_like(op, "grad", grad, "x_adv", x_adv, *format);
  check_per_sample(op, "eps_per_sample", eps_t, x_adv);
  check_per_sample(op, "alpha_per_sample", alpha_t, x_adv);
  TORCH_CHECK(eps_t.has_value() || eps >= 0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(alpha_t.has_value() || alpha > 0, op, ": alpha must be > 0, got ", alpha);
  TORCH_CHECK(lower < upper, op, ": lower must be < upper, got lower=", lower, ", upper=", upper);
  return *format;
}

inline at::MemoryFormat check_init(const char* op, at::DeviceType device, const at::Tensor& x,
                                   const at::Tensor& noise, double eps,
                                   const std::optional<at::Tensor>& eps_t, double lower, double upper) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(is_supported_float(dtype), op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(noise.scalar_type() == at::kFloat, op, ": noise must be float32, got ", noise.scalar_type());
  const auto format = dense_format(x);
  TORCH_CHECK(format.has_value(), op, ": x must be contiguous or channels_last");
  check_like(op, "noise", noise, "x", x, *format);
  check_per_sample(op, "eps_per_sample", eps_t, x);
  TORCH_CHECK(eps_t.has_value() || eps >= 0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(lower < upper, op, ": lower must be < upper, got lower=", lower, ", upper=", upper);
  return *format;
}

}  // namespace pyadvk
