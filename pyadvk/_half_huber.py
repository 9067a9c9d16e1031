"""The arithmetic of the Half-Huber ReLU ops, shared by their torch body (pyadvk/ops/half_huber.py,
where the ops, their formulas and their public wrapper are documented) and their Triton body
(kernels/half_huber.py). A leaf above torch: it imports only the bottom layer, so the Triton body
does not import the ops package back.

Here: the constants every body rounds (:func:`constants`), the torch reference of each op (the
definition of the ops and the Triton ops' float64 path), and the derivatives of each op written
with the ops of one body (:func:`register_autograd` registers them for the compiled and the
Triton ops; the torch body's autograd.Functions use the same ``grad*_of_*`` functions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyadvk._layout import same_layout

# ---------------------------------------------------------------------------------------------
# The torch bodies: the definition of each op.


def constants(delta: float) -> tuple[float, float, float, float]:
    """(delta, delta/2, 1/delta, 1/(2 delta)), in double; every body rounds them to its compute type."""
    return delta, delta / 2, 1.0 / delta, 1.0 / (2.0 * delta)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# The constants are Python floats: an op between a tensor and a Python float rounds the float to
# the tensor's dtype (here the compute dtype), exactly as the kernels round them.


def half_huber_relu_reference(x: torch.Tensor, delta: float) -> torch.Tensor:
    """``f(x)`` (see pyadvk/ops/half_huber.py), computed in float32 (float64 for float64 input)."""
    d, half, _, inv2d = constants(delta)
    v = x.to(_compute_dtype(x))
    y = torch.where(v >= d, v - half, torch.where(v <= 0, 0.0, v * v * inv2d))
    return y.to(x.dtype)


def half_huber_relu_backward_reference(grad: torch.Tensor, x: torch.Tensor, delta: float) -> torch.Tensor:
    """``grad * f'(x)``."""
    d, _, invd, _ = constants(delta)
    ct = _compute_dtype(x)
    v, g = x.to(ct), grad.to(ct)
    return torch.where(v >= d, g, torch.where(v <= 0, 0.0, g * (v * invd))).to(x.dtype)


def half_huber_relu_double_backward_reference(
    gg: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gg * f'(x), gg * grad * f''(x))``: the gradients of ``<gg, grad * f'(x)>`` with respect
    to ``grad`` and ``x``."""
    d, _, invd, _ = constants(delta)
    ct = _compute_dtype(x)
    v = x.to(ct)
    d_grad = half_huber_relu_backward_reference(gg, x, delta)
    d_x = torch.where((v > 0) & (v < d), gg.to(ct) * grad.to(ct) * invd, 0.0)
    return d_grad, d_x.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Bodies as (forward, backward, double_backward) callables, and their derivatives.


class Body:
    """The three ops of one body."""

    def __init__(self, forward, backward, double_backward):
        self.forward = forward
        self.backward = backward
        self.double_backward = double_backward


def native_body() -> Body:
    """The compiled ops (cpp and cuda bodies)."""
    ops = torch.ops.pyadvk
    return Body(ops.half_huber_relu, ops.half_huber_relu_backward, ops.half_huber_relu_double_backward)


def triton_body() -> Body:
    """The Triton ops (kernels/half_huber.py)."""
    ops = torch.ops.pyadvk
    return Body(
        ops.half_huber_relu_triton, ops.half_huber_relu_backward_triton, ops.half_huber_relu_double_backward_triton
    )


def _like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` with x's dtype and layout (the compiled ops need operands of one layout)."""
    if t is None:
        return None
    if t.dtype != x.dtype:
        t = t.to(x.dtype)
    if not same_layout(t, x):
        t = torch.empty_like(x).copy_(t)
    return t


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def grad_of_forward(body: Body, grad, x, delta):
    """d f(x) / dx applied to ``grad``."""
    return body.backward(_like(grad, x), x, delta)


def grads_of_backward(body: Body, gg, grad, x, delta):
    """Gradients of ``b = grad * f'(x)`` for an incoming ``gg``: (wrt grad, wrt x)."""
    if gg is None:
        return None, None
    return body.double_backward(_like(gg, x), _like(grad, x), x, delta)


def grads_of_double_backward(body: Body, ga, gb, gg, grad, x, delta):
    """Gradients of ``(a, b) = (gg f'(x), gg grad f''(x))`` for incoming ``(ga, gb)``, with f''' = 0:
    wrt gg: ``ga f' + gb grad f''``; wrt grad: ``gb gg f''``; wrt x: ``ga gg f''``."""
    ga, gb = _like(ga, x), _like(gb, x)
    d_gg = d_grad = d_x = None
    if ga is not None:
        d_gg = body.backward(ga, x, delta)
        d_x = body.double_backward(ga, gg, x, delta)[1]
    if gb is not None:
        d_gg = _add(d_gg, body.double_backward(gb, grad, x, delta)[1])
        d_grad = body.double_backward(gb, gg, x, delta)[1]
    return d_gg, d_grad, d_x


def register_autograd(body_fn: Callable[[], Body], names: tuple[str, str, str]) -> None:
    """Registers the derivatives of the three ops ``names`` (forward, backward, double backward)
    of a compiled or Triton body, each made of the ops ``body_fn()`` returns (called at backward
    time, so the ops need not exist yet)."""
    fwd, bwd, dbl = names

    def setup_forward(ctx, inputs, output):
        x, delta = inputs
        ctx.save_for_backward(x)
        ctx.delta = delta

    def backward_forward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad_of_forward(body_fn(), grad, x, ctx.delta), None

    def setup_backward(ctx, inputs, output):
        grad, x, delta = inputs
        ctx.save_for_backward(grad, x)
        ctx.delta = delta

    def backward_backward(ctx, gg):
        grad, x = ctx.saved_tensors
        d_grad, d_x = grads_of_backward(body_fn(), gg, grad, x, ctx.delta)
        return d_grad, d_x, None

    def setup_double(ctx, inputs, output):
        gg, grad, x, delta = inputs
        ctx.save_for_backward(gg, grad, x)
        ctx.delta = delta

    def backward_double(ctx, ga, gb):
        gg, grad, x = ctx.saved_tensors
        return (*grads_of_double_backward(body_fn(), ga, gb, gg, grad, x, ctx.delta), None)

    torch.library.register_autograd(f"pyadvk::{fwd}", backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(f"pyadvk::{bwd}", backward_backward, setup_context=setup_backward)
    torch.library.register_autograd(f"pyadvk::{dbl}", backward_double, setup_context=setup_double)
