"""The Half-Huber ReLU of Woods et al. (2019) as fused ops: forward, backward and double backward.

Where each body lives (one hop from here):

    torch   the ``*_reference`` functions in pyadvk/_half_huber.py (the definition of the ops; the
            derivatives and their registration are there too, shared with the Triton body)
    cpp     csrc/half_huber.cpp (checks, outputs) -> csrc/cpu/half_huber_kernels.inc (the loops,
            compiled per instruction set by csrc/cpu/kernels_{default,avx2,avx512}.cpp)
    cuda    csrc/cuda/half_huber.cu (helpers: csrc/cuda/common.cuh)
    triton  kernels/half_huber.py (helpers: kernels/_common.py)
    tests   tests/test_half_huber.py, test_fuzz_bodies.py, test_half_huber_gpu.py
    bench   benchmarks/bench_half_huber.py

For ``delta > 0``::

    f(x)   = 0               for x <= 0
           = x^2 / (2 delta) for 0 < x < delta
           = x - delta / 2   for x >= delta
    f'(x)  = clamp(x / delta, 0, 1)
    f''(x) = 1 / delta on 0 < x < delta, else 0

f is a ReLU whose kink is rounded into a parabola, so its second derivative is non-zero on
(0, delta): an input-gradient penalty (:func:`pyadvk.lipschitz.input_gradient_penalty`), which
differentiates the network's input gradient once more, gets a useful signal through it (through a
ReLU, f'' = 0 almost everywhere).

Three ops, each with four bodies (cuda, triton, cpp and the torch reference below):

* ``half_huber_relu(x, delta) -> y = f(x)``
* ``half_huber_relu_backward(grad, x, delta) -> grad * f'(x)``
* ``half_huber_relu_double_backward(gg, grad, x, delta) -> (gg * f'(x), gg * grad * f''(x))``:
  the derivatives of ``<gg, grad * f'(x)>`` with respect to ``grad`` and to ``x``.

Each op's backward is registered with ``torch.library.register_autograd`` and is made of these same
ops (f''' = 0 where it exists), so gradients of any order are available; torch.compile sees every
op through its fake kernel (forward and backward; AOTAutograd refuses double backward through a
compiled region, for any op). The derivative at the breakpoints is the one-sided value the formulas
above give: f'(0) = 0, f'(delta) = 1, f''(0) = f''(delta) = 0.

Arithmetic is float32 for float32/float16/bfloat16 inputs (rounded to the input dtype at the end)
and float64 for float64 inputs; float64 exists so that ``torch.autograd.gradcheck`` and
``gradgradcheck`` can check the derivatives. The cpp and cuda bodies compute float64 natively; the
Triton ops hand float64 tensors to the torch reference (Triton passes float arguments as float32).
The constants are computed once in double and rounded to the compute type: ``delta``,
``delta/2``, ``1/delta`` and ``1/(2 delta)`` (so a delta that float32 cannot represent acts as its
float32 rounding); every body evaluates exactly these expressions, in this order (no fused
multiply-add), so results agree bit for bit in float32 and within one unit in the last place after
rounding to float16/bfloat16::

    y    = x >= delta ? x - delta/2 : (x <= 0 ? 0 : (x * x) * (1/(2 delta)))
    dx   = x >= delta ? grad        : (x <= 0 ? 0 : grad * (x * (1/delta)))
    dxx  = 0 < x < delta ? (gg * grad) * (1/delta) : 0

Non-finite values: a NaN input gives a NaN output and a NaN input gradient (and 0 second
derivative); x = +inf gives +inf and passes the gradient, x = -inf gives 0 and no gradient; NaN or
inf in ``grad``/``gg`` propagate through the products (``0 * inf`` is NaN where the slope or
curvature is used). ``delta`` must be finite and > 0 (in float64 terms: a delta beyond float32's
range acts on float32/16-bit tensors as its float32 rounding, inf). Every body gives the torch
body's result on such values (tests/test_fuzz_bodies.py).

Tensors may have any shape and any non-overlapping dense layout (contiguous, channels_last, ...);
the compiled ops require every operand to share x's dtype, shape and strides (the public wrapper
and the autograd formulas convert); outputs have x's layout.
"""

from __future__ import annotations

import math

import torch

from pyadvk import _backend, _checks
from pyadvk._half_huber import Body as _Body
from pyadvk._half_huber import (
    constants,
    grad_of_forward,
    grads_of_backward,
    grads_of_double_backward,
    half_huber_relu_backward_reference,
    half_huber_relu_double_backward_reference,
    half_huber_relu_reference,
    register_autograd,
)
from pyadvk._half_huber import native_body as _native_body
from pyadvk._half_huber import triton_body as _triton_body  # noqa: F401 (the bodies by name, for the tests)
from pyadvk._layout import is_dense, same_layout
from pyadvk.ops._library import define

__all__ = [
    "DTYPES",
    "HALF_HUBER",
    "check_delta",
    "constants",
    "half_huber_relu",
    "half_huber_relu_backward_reference",
    "half_huber_relu_double_backward_reference",
    "half_huber_relu_reference",
    "is_dense",
    "same_layout",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

define("half_huber_relu(Tensor x, float delta) -> Tensor")
define("half_huber_relu_backward(Tensor grad, Tensor x, float delta) -> Tensor")
define("half_huber_relu_double_backward(Tensor gg, Tensor grad, Tensor x, float delta) -> (Tensor, Tensor)")


@torch.library.register_fake("pyadvk::half_huber_relu")
def _fake_forward(x, delta):
    return torch.empty_like(x)


@torch.library.register_fake("pyadvk::half_huber_relu_backward")
def _fake_backward(grad, x, delta):
    return torch.empty_like(x)


@torch.library.register_fake("pyadvk::half_huber_relu_double_backward")
def _fake_double_backward(gg, grad, x, delta):
    return torch.empty_like(x), torch.empty_like(x)


HALF_HUBER = _backend.OpBodies(
    "half_huber_relu",
    native_ops=("half_huber_relu", "half_huber_relu_backward", "half_huber_relu_double_backward"),
)


# ---------------------------------------------------------------------------------------------
# The torch bodies (the definition of each op), the derivatives and their registration are in
# pyadvk/_half_huber.py, which the Triton body imports too; the compiled ops' derivatives:

register_autograd(_native_body, ("half_huber_relu", "half_huber_relu_backward", "half_huber_relu_double_backward"))

_TORCH = _Body(half_huber_relu_reference, half_huber_relu_backward_reference, half_huber_relu_double_backward_reference)


# The torch body: autograd.Functions running the reference formulas, with the same derivatives.


class _TorchDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gg, grad, x, delta):
        ctx.save_for_backward(gg, grad, x)
        ctx.delta = delta
        return half_huber_relu_double_backward_reference(gg, grad, x, delta)

    @staticmethod
    def backward(ctx, ga, gb):
        gg, grad, x = ctx.saved_tensors
        return (*grads_of_double_backward(_TORCH_AUTOGRAD, ga, gb, gg, grad, x, ctx.delta), None)


class _TorchBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, delta):
        ctx.save_for_backward(grad, x)
        ctx.delta = delta
        return half_huber_relu_backward_reference(grad, x, delta)

    @staticmethod
    def backward(ctx, gg):
        grad, x = ctx.saved_tensors
        return (*grads_of_backward(_TORCH_AUTOGRAD, gg, grad, x, ctx.delta), None)


class _TorchForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta):
        ctx.save_for_backward(x)
        ctx.delta = delta
        return half_huber_relu_reference(x, delta)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad_of_forward(_TORCH_AUTOGRAD, grad, x, ctx.delta), None


_TORCH_AUTOGRAD = _Body(_TorchForward.apply, _TorchBackward.apply, _TorchDoubleBackward.apply)


# ---------------------------------------------------------------------------------------------
# Public wrapper.


def check_delta(delta) -> float:
    """``delta`` must be a finite real number > 0."""
    delta = _checks.real("delta", delta, low=0.0, low_inclusive=False)
    if not math.isfinite(delta):
        raise ValueError(f"delta must be finite, got {delta}")
    return delta


def half_huber_relu(x: torch.Tensor, delta: float = 0.5, *, backend: str | None = None) -> torch.Tensor:
    """The Half-Huber ReLU ``f(x)`` elementwise (see the module docstring), differentiable to any
    order (fused backward and double backward).

    Args:
        x: a float32, float16, bfloat16 or float64 tensor of any shape; any dense layout
            (contiguous, channels_last, ...) is kept; other strided views are computed on a
            contiguous copy.
        delta: the width of the quadratic part (> 0, finite).
        backend: force a body ("cuda", "triton", "cpp", "torch"); default: see pyadvk.set_backend.
    """
    _checks.tensor("x", x, dtypes=DTYPES, min_dim=0)
    delta = check_delta(delta)
    name = _backend.resolve(HALF_HUBER, x.device, backend)
    if not is_dense(x):
        x = x.contiguous()
    if name == "torch":
        return _TorchForward.apply(x, delta)
    if name == "triton":
        return torch.ops.pyadvk.half_huber_relu_triton(x, delta)
    return torch.ops.pyadvk.half_huber_relu(x, delta)
