// CPU body of the boundary projection: argument checks and the call into the hot loops of the best
// instruction set (csrc/cpu/boundary_projection_kernels.inc, dispatched by cpu/isa.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "boundary_projection.h"
#include "cpu/isa.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(boundary_projection, BoundaryProjectionArgs)

namespace {

at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double lower, double upper,
                   c10::string_view norm) {
  check_boundary_projection("boundary_projection", at::kCPU, x, w, b, lower, upper, norm);
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out.zero_();
  // The probes read each row's breakpoints and weights from here (computed once, no division nor
  // branch per probe): 16 bytes per value.
  auto scratch = at::empty({2 * x.numel()}, x.options().dtype(at::kDouble));
  BoundaryProjectionArgs args{x.scalar_type(), x.data_ptr(), w.data_ptr(), b.data_ptr(),  out.data_ptr(),
                              x.size(0),       x.size(1),    lower,        upper,         norm == "l2",
                              scratch.data_ptr<double>()};
  boundary_projection_dispatch(args);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) { m.impl("boundary_projection", &project); }

}  // namespace pyadvk
