// CPU body of the batched power iteration: argument checks, task tables, workspace, and the call
// into the hot loops of the best instruction set (csrc/cpu/power_iteration_kernels.inc).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "power_iteration.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(power_iteration, PowerIterArgs)

namespace {

// Columns per task of v = Wᵀu, weights per task of t = W v.
constexpr int64_t kColBlock = 512;
constexpr int64_t kRowElems = 32768;

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> power_iteration_cpu(
    at::TensorList weights, at::TensorList us, int64_t n_iters) {
  check_power_iteration("power_iteration", at::kCPU, weights, us, n_iters);
  auto plan = plan_power_iteration(weights, us, kColBlock, kRowElems, INT64_MAX);
  const auto opts = weights[0].options();
  auto t = at::empty({std::max<int64_t>(plan.t_total, 1)}, opts.dtype(at::kFloat));
  auto partial = at::empty({std::max<int64_t>(std::max(plan.n_col_tasks, plan.n_row_tasks), 1)},
                           opts.dtype(at::kDouble));
  PowerIterArgs args{weights[0].scalar_type(),
                     static_cast<int64_t>(weights.size()),
                     plan.meta.data_ptr<int64_t>(),
                     plan.n_col_tasks,
                     plan.col_tasks.data_ptr<int64_t>(),
                     plan.n_row_tasks,
                     plan.row_tasks.data_ptr<int64_t>(),
                     t.data_ptr<float>(),
                     partial.data_ptr<double>(),
                     plan.sigma.data_ptr<float>(),
                     n_iters};
  power_iteration_dispatch(args);
  return {plan.sigma, plan.us, plan.vs};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) { m.impl("power_iteration", &power_iteration_cpu); }

}  // namespace pyadvk
