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
constexpr int64_t kColBlockBytes = 512 * 1024;

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(at::TensorList weights, const at::Tensor& u,
                                                                   int64_t n_iters) {
  check_power_iteration("power_iteration_packed", at::kCPU, weights, u, n_iters);
  // (The tables cost microseconds here; the row tasks are not used by the CPU kernels.)
  const auto tables =
      power_iteration_tables(weights, kPowerIterCpuColBlock, kColBlockBytes, /*row_chunk=*/0, INT64_MAX, INT64_MAX);
  const auto opts = weights[0].options().dtype(at::kFloat);
  auto u_out = u.clone();
  auto v_out = at::empty({tables.v_total}, opts);
  auto sigma = at::empty({static_cast<int64_t>(weights.size())}, opts);
  auto t_part = at::empty({std::max<int64_t>(tables.part_total, 1)}, opts);
  auto partial = at::empty({std::max<int64_t>(tables.n_col(), 1)}, opts.dtype(at::kDouble));
  PowerIterArgs args{weights[0].scalar_type(),
                     static_cast<int64_t>(weights.size()),
                     tables.meta.data(),
                     tables.n_col(),
                     tables.col.data(),
                     u_out.data_ptr<float>(),
                     v_out.data_ptr<float>(),
                     t_part.data_ptr<float>(),
                     partial.data_ptr<double>(),
                     sigma.data_ptr<float>(),
                     n_iters};
  power_iteration_dispatch(args);
  return {sigma, u_out, v_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) { m.impl("power_iteration_packed", &power_iteration_cpu); }

}  // namespace pyadvk
