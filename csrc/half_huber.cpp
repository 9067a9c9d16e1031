// CPU bodies of the Half-Huber ReLU ops: argument checks, outputs, and the call into the hot loops
// of the best instruction set (csrc/cpu/half_huber_kernels.inc, dispatched by cpu/isa.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/isa.h"
#include "half_huber.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(half_huber, HalfHuberArgs)

namespace {

HalfHuberArgs make_args(HalfHuberOp op, const at::Tensor& x, double delta) {
  HalfHuberArgs args{};
  args.op = op;
  args.dtype = x.scalar_type();
  args.x = x.data_ptr();
  args.n = x.numel();
  args.delta = delta;
  return args;
}

at::Tensor forward(const at::Tensor& x, double delta) {
  check_half_huber("half_huber_relu", at::kCPU, x, delta, {});
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  auto args = make_args(HalfHuberOp::Forward, x, delta);
  args.out = out.data_ptr();
  half_huber_dispatch(args);
  return out;
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, double delta) {
  check_half_huber("half_huber_relu_backward", at::kCPU, x, delta, {{"grad", &grad}});
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  auto args = make_args(HalfHuberOp::Backward, x, delta);
  args.grad = grad.data_ptr();
  args.out = out.data_ptr();
  half_huber_dispatch(args);
  return out;
}

std::tuple<at::Tensor, at::Tensor> double_backward(const at::Tensor& gg, const at::Tensor& grad,
                                                   const at::Tensor& x, double delta) {
  check_half_huber("half_huber_relu_double_backward", at::kCPU, x, delta, {{"gg", &gg}, {"grad", &grad}});
  auto d_grad = at::empty_like(x);
  auto d_x = at::empty_like(x);
  if (x.numel() == 0) return {d_grad, d_x};
  auto args = make_args(HalfHuberOp::DoubleBackward, x, delta);
  args.gg = gg.data_ptr();
  args.grad = grad.data_ptr();
  args.out = d_grad.data_ptr();
  args.out2 = d_x.data_ptr();
  half_huber_dispatch(args);
  return {d_grad, d_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) {
  m.impl("half_huber_relu", &forward);
  m.impl("half_huber_relu_backward", &backward);
  m.impl("half_huber_relu_double_backward", &double_backward);
}

}  // namespace pyadvk
