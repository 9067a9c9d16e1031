"""Triton bodies of the Half-Huber ReLU ops: ``pyadvk::half_huber_relu_triton``,
``half_huber_relu_backward_triton`` and ``half_huber_relu_double_backward_triton``
(pyadvk/ops/half_huber.py defines the ops; the torch references and the derivatives used here are
in pyadvk/_half_huber.py, so this module does not import the ops package).

Elementwise over numel values in memory order (every operand shares x's dense layout), BLOCK values
per program (autotuned per size class, kernels/_common.py), int64 offsets, launched on x's device.
The constants (delta, delta/2, 1/delta, 1/(2 delta)) are computed on the host in double and cast to
float32 inside the kernel, and the formulas keep the reference's order, so results match the other
bodies. Float64 tensors (used for gradcheck) are computed by the torch reference inside these ops:
Triton passes Python float arguments as float32, so the kernels could not see the float64
constants. Registered with torch.library.triton_op (torch.compile sees through them), with the same
autograd formulas as the compiled ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pyadvk._half_huber import (
    constants,
    half_huber_relu_backward_reference,
    half_huber_relu_double_backward_reference,
    half_huber_relu_reference,
    register_autograd,
    triton_body,
)
from pyadvk.kernels._common import ELEMENTWISE_CONFIGS, benchmark, on_device_of, size_class

_AUTOTUNE = dict(configs=ELEMENTWISE_CONFIGS, key=["size_class"], do_bench=benchmark)


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _const(value):
    return tl.cast(value, tl.float32)


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _slope_times(g, v, delta, invd):
    return tl.where(v >= delta, g, tl.where(v <= 0.0, 0.0, g * (v * invd)))


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _forward_kernel(x_ptr, y_ptr, n, delta, half, inv2d, size_class, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    v = _load(x_ptr, offs, mask)
    d = _const(delta)
    y = tl.where(v >= d, v - _const(half), tl.where(v <= 0.0, 0.0, v * v * _const(inv2d)))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _backward_kernel(g_ptr, x_ptr, out_ptr, n, delta, invd, size_class, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    v = _load(x_ptr, offs, mask)
    g = _load(g_ptr, offs, mask)
    out = _slope_times(g, v, _const(delta), _const(invd))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _double_backward_kernel(gg_ptr, g_ptr, x_ptr, a_ptr, b_ptr, n, delta, invd, size_class, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    v = _load(x_ptr, offs, mask)
    g = _load(g_ptr, offs, mask)
    gg = _load(gg_ptr, offs, mask)
    d = _const(delta)
    k = _const(invd)
    a = _slope_times(gg, v, d, k)
    b = tl.where((v > 0.0) & (v < d), gg * g * k, 0.0)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


@triton_op("pyadvk::half_huber_relu_triton", mutates_args=())
def half_huber_relu_triton(x: torch.Tensor, delta: float) -> torch.Tensor:
    if x.dtype == torch.float64:
        return half_huber_relu_reference(x, delta)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        d, half, _, inv2d = constants(delta)
        with on_device_of(x):
            wrap_triton(_forward_kernel)[_grid(n)](x, y, n, d, half, inv2d, size_class(n))
    return y


@triton_op("pyadvk::half_huber_relu_backward_triton", mutates_args=())
def half_huber_relu_backward_triton(grad: torch.Tensor, x: torch.Tensor, delta: float) -> torch.Tensor:
    if x.dtype == torch.float64:
        return half_huber_relu_backward_reference(grad, x, delta)
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        d, _, invd, _ = constants(delta)
        with on_device_of(x):
            wrap_triton(_backward_kernel)[_grid(n)](grad, x, out, n, d, invd, size_class(n))
    return out


@triton_op("pyadvk::half_huber_relu_double_backward_triton", mutates_args=())
def half_huber_relu_double_backward_triton(
    gg: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype == torch.float64:
        return half_huber_relu_double_backward_reference(gg, grad, x, delta)
    d_grad = torch.empty_like(x)
    d_x = torch.empty_like(x)
    n = x.numel()
    if n:
        d, _, invd, _ = constants(delta)
        with on_device_of(x):
            wrap_triton(_double_backward_kernel)[_grid(n)](gg, grad, x, d_grad, d_x, n, d, invd, size_class(n))
    return d_grad, d_x


register_autograd(
    triton_body,
    ("half_huber_relu_triton", "half_huber_relu_backward_triton", "half_huber_relu_double_backward_triton"),
)
