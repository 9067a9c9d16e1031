// CPU bodies of the fused APGD step: argument checks, workspace, and the call into the hot loops of
// the best instruction set (csrc/cpu/apgd_kernels.inc, dispatched by cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "apgd.h"
#include "cpu/isa.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(apgd_step, ApgdStepArgs)

namespace {

void run_step(Norm norm, const char* op, const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x_orig,
              const at::Tensor& grad, double eta, const std::optional<at::Tensor>& eta_t, double eps,
              const std::optional<at::Tensor>& eps_t, double momentum, double lower, double upper, at::Tensor& out) {
  check_apgd_step(op, at::kCPU, x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper);
  if (x.numel() == 0) return;
  const int64_t B = x.size(0), D = x.numel() / B;
  // Workspace only for the l2 step in phases: none for linf or a sample at a time.
  at::Tensor partial, scalars;
  const bool workspace =
      norm == Norm::L2 && !apgd_l2_sample_at_a_time(B, D, x.element_size(), at::get_num_threads());
  if (workspace) {
    partial = at::empty({3 * cpu_tiles(B, D)}, x.options().dtype(at::kDouble));
    static_assert(sizeof(ApgdL2Scalars) == 2 * sizeof(double), "ApgdL2Scalars is stored in a double tensor");
    scalars = at::empty({2 * B}, x.options().dtype(at::kDouble));
  }
  ApgdStepArgs args{norm,
                    x.scalar_type(),
                    x.data_ptr(),
                    x_prev.data_ptr(),
                    x_orig.data_ptr(),
                    grad.data_ptr(),
                    out.data_ptr(),
                    B,
                    D,
                    optional_data(eta_t),
                    static_cast<float>(eta),
                    optional_data(eps_t),
                    eps,
                    static_cast<float>(momentum),
                    static_cast<float>(1.0 - momentum),
                    static_cast<float>(lower),
                    static_cast<float>(upper),
                    workspace ? partial.data_ptr<double>() : nullptr,
                    workspace ? reinterpret_cast<ApgdL2Scalars*>(scalars.data_ptr<double>()) : nullptr};
  apgd_step_dispatch(args);
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

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) {
  m.impl("apgd_step_linf", &step<Norm::Linf>);
  m.impl("apgd_step_linf_", &step_<Norm::Linf>);
  m.impl("apgd_step_l2", &step<Norm::L2>);
  m.impl("apgd_step_l2_", &step_<Norm::L2>);
}

}  // namespace pyadvk
