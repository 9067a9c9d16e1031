// CPU body of the batched power iteration: argument checks, task tables, workspace, and the call
// into the hot loops of the best instruction set (csrc/cpu/power_iteration_kernels.inc).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "power_iteration.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(power_iteration, PowerIterArgs)

namespace {

// Columns per task: at most 512, and at most 512 KiB of W, so that a task's block is still in the
// core's L2 (1-2 MiB) when it is read the second time, for W v (power_iteration_kernels.inc).
constexpr int64_t kColBlock = 512;
constexpr int64_t kColBlockBytes = 512 * 1024;

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> power_iteration_cpu(
    at::TensorList weights, at::TensorList us, int64_t n_iters) {
  check_power_iteration("power_iteration", at::kCPU, weights, us, n_iters);
  // (Row tasks are not used by the CPU kernels: one row task per matrix keeps the table short.)
  auto plan = plan_power_iteration(weights, us, kColBlock, INT64_MAX, INT64_MAX, kColBlockBytes);
  const auto opts = weights[0].options();
  auto t_part = at::empty({std::max<int64_t>(plan.t_part_total, 1)}, opts.dtype(at::kFloat));
  auto partial = at::empty({std::max<int64_t>(plan.n_col_tasks, 1)}, opts.dtype(at::kDouble));
  PowerIterArgs args{weights[0].scalar_type(),
                     static_cast<int64_t>(weights.size()),
                     plan.meta.data_ptr<int64_t>(),
                     plan.n_col_tasks,
                     plan.col_tasks.data_ptr<int64_t>(),
                     t_part.data_ptr<float>(),
                     partial.data_ptr<double>(),
                     plan.sigma.data_ptr<float>(),
                     n_iters};
  power_iteration_dispatch(args);
  return {plan.sigma, plan.us, plan.vs};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) { m.impl("power_iteration", &power_iteration_cpu); }

}  // namespace pyadvk
