// Shared declarations and argument checks for the fused APGD step (CPU and CUDA bodies).
//
// The ops (schemas and the torch reference in pyadvk/ops/apgd.py) see every tensor as a (B, D)
// matrix, like the PGD ops (pgd.h): x, x_prev, x_orig and grad share one dense memory format.
// Per sample, with eta/eps per sample, a the momentum and P the projection (ball, then box):
//   z = P(x + eta * step(g)),  y = P(x + a (z - x) + (1 - a)(x - x_prev)).
// linf is one pass. l2 is three: (1) the sums |g|^2, |x - x_orig|^2 and <x - x_orig, g> in double,
// which give |g| and the norm of x + eta g/|g| - x_orig (so the first projection needs no pass of
// its own); (2) |w - x_orig|^2 of the momentum point w, in double, recomputing z on the fly; (3) the
// write. Double sums keep |g| exact for any float gradient (float squares under/overflow beyond
// 1e+-19), and g / |g| is formed in float once |g| is rounded to float (finite up to |g| = 3e38,
// so gradient entries up to about 1e36); the cancellation in the expanded norm of pass 1 costs at
// most 1e-16 of |x - x_orig|^2 + eta^2, far below the float32 rounding of the reference itself.
#pragma once

#include "common.h"
#include "pgd.h"

namespace pyadvk {

// The cpp l2 step runs all four passes over one sample on one thread when its four inputs fit in
// kL2ResidentBytes (pgd.h): the later passes then read it from that core's cache.
inline bool apgd_l2_sample_at_a_time(int64_t B, int64_t D, int64_t item_size, int64_t threads) {
  return 4 * D * item_size <= kL2ResidentBytes && B >= threads;
}

// Per-sample scalars of the l2 step: inv after pass 1, f1 after pass 2, f2 after pass 3.
struct ApgdL2Scalars {
  double inv;  // 1/|g| (0 when |g| = 0); the step is g * inv in double rounded to float, as the reference
  float f1;    // projection factor of z: min(1, eps/|x + eta g/|g| - x_orig|)
  float f2;    // projection factor of y: min(1, eps/|w - x_orig|)
};

// Arguments of one APGD step as the CPU kernels (csrc/cpu/apgd_kernels.inc) see them.
struct ApgdStepArgs {
  Norm norm;
  at::ScalarType dtype;
  const void* x;
  const void* x_prev;
  const void* x_orig;
  const void* grad;
  void* out;  // may equal x_prev (in place)
  int64_t B, D;
  const float* eta_t;  // per-sample eta, or nullptr to use eta
  float eta;
  const float* eps_t;  // per-sample eps, or nullptr to use eps
  double eps;          // as given: linf rounds it to float, l2 divides by the norm in double
  float momentum;
  float rest;  // 1 - momentum, rounded once from double (as the reference's scalar is)
  float lower, upper;
  double* partial;         // l2 in phases: 3 * cpu_tiles(B, D) doubles of workspace, else null
  ApgdL2Scalars* scalars;  // l2 in phases: B entries of workspace, else null
};

// Checks every argument of an APGD step and returns the common memory format.
inline at::MemoryFormat check_apgd_step(const char* op, at::DeviceType device, const at::Tensor& x,
                                        const at::Tensor& x_prev, const at::Tensor& x_orig, const at::Tensor& grad,
                                        double eta, const std::optional<at::Tensor>& eta_t, double eps,
                                        const std::optional<at::Tensor>& eps_t, double momentum, double lower,
                                        double upper) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(is_supported_float(dtype), op, ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(x_prev.scalar_type() == dtype && x_orig.scalar_type() == dtype && grad.scalar_type() == dtype, op,
              ": x_prev, x_orig and grad must have the dtype of x (", dtype, "), got ", x_prev.scalar_type(), ", ",
              x_orig.scalar_type(), " and ", grad.scalar_type());
  const auto format = dense_format(x);
  TORCH_CHECK(format.has_value(), op, ": x must be contiguous or channels_last");
  check_like(op, "x_prev", x_prev, "x", x, *format);
  check_like(op, "x_orig", x_orig, "x", x, *format);
  check_like(op, "grad", grad, "x", x, *format);
  check_per_sample(op, "eta_per_sample", eta_t, x);
  check_per_sample(op, "eps_per_sample", eps_t, x);
  TORCH_CHECK(eta_t.has_value() || eta >= 0, op, ": eta must be >= 0, got ", eta);
  TORCH_CHECK(eps_t.has_value() || eps >= 0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(momentum >= 0 && momentum <= 1, op, ": momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(lower < upper, op, ": lower must be < upper, got lower=", lower, ", upper=", upper);
  return *format;
}

}  // namespace pyadvk
