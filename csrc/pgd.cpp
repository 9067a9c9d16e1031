// CPU bodies of the fused PGD ops: argument checks, workspace, and the call into the hot loops of
// the best instruction set (csrc/cpu/pgd_kernels.inc, dispatched by cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "pgd.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(pgd_step, PgdStepArgs)
PYADVK_CPU_KERNEL(random_init_linf, LinfInitArgs)

namespace {

void run_step(Norm norm, const char* op, const at::Tensor& x_adv, const at::Tensor& x_orig,
              const at::Tensor& grad, double eps, double alpha, const std::optional<at::Tensor>& eps_t,
              const std::optional<at::Tensor>& alpha_t, double lower, double upper, at::Tensor& out) {
  check_step(op, at::kCPU, x_adv, x_orig, grad, eps, alpha, eps_t, alpha_t, lower, upper);
  if (x_adv.numel() == 0) return;
  const int64_t B = x_adv.size(0), D = x_adv.numel() / B;
  // Workspace only for the l2 step's two-phase schedule: none for linf or a sample at a time.
  at::Tensor partial, scalars;
  const bool workspace =
      norm == Norm::L2 && !l2_sample_at_a_time(B, D, x_adv.element_size(), at::get_num_threads());
  if (workspace) {
    partial = at::empty({2 * cpu_tiles(B, D)}, x_adv.options().dtype(at::kDouble));
    scalars = at::empty({2 * B}, x_adv.options().dtype(at::kDouble));
  }
  PgdStepArgs args{norm,
                   x_adv.scalar_type(),
                   x_adv.data_ptr(),
                   x_orig.data_ptr(),
                   grad.data_ptr(),
                   out.data_ptr(),
                   B,
                   D,
                   optional_data(eps_t),
                   static_cast<float>(eps),
                   optional_data(alpha_t),
                   static_cast<float>(alpha),
                   static_cast<float>(lower),
                   static_cast<float>(upper),
                   workspace ? partial.data_ptr<double>() : nullptr,
                   workspace ? scalars.data_ptr<double>() : nullptr};
  pgd_step_dispatch(args);
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
  check_init("random_init_linf", at::kCPU, x, noise, eps, eps_t, lower, upper);
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t B = x.size(0);
  LinfInitArgs args{x.scalar_type(), x.data_ptr(), noise.data_ptr<float>(), out.data_ptr(), B,
                    x.numel() / B, optional_data(eps_t), static_cast<float>(eps),
                    static_cast<float>(lower), static_cast<float>(upper)};
  random_init_linf_dispatch(args);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) {
  m.impl("pgd_step_linf", &step<Norm::Linf>);
  m.impl("pgd_step_linf_", &step_<Norm::Linf>);
  m.impl("pgd_step_l2", &step<Norm::L2>);
  m.impl("pgd_step_l2_", &step_<Norm::L2>);
  m.impl("random_init_linf", &random_init_linf);
}

}  // namespace pyadvk
