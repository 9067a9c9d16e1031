"""Triton bodies of the Half-Huber ReLU ops (pyadvk/ops/half_huber.py defines them).

Elementwise over numel values in memory order (every operand shares x's dense layout), BLOCK values
per program, int64 offsets. The constants (delta, delta/2, 1/delta, 1/(2 delta)) are computed on the
host in double and cast to the compute type inside the kernel, and the formulas keep the reference's
order, so results match the other bodies. Float64 tensors are computed in float64 (for gradcheck).
Registered with torch.library.triton_op (torch.compile sees through them), with the same
autograd formulas as the compiled ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pyadvk.ops import half_huber as ops

_BLOCK = 1024


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _const(value, F64: tl.constexpr):
    if F64:
        out = tl.cast(value, tl.float64)
    else:
        out = tl.cast(value, tl.float32)
    return out


@triton.jit
def _load(ptr, offs, mask, F64: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask, other=0.0)
    if F64:
        out = v.to(tl.float64)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _slope_times(g, v, delta, invd):
    return tl.where(v >= delta, g, tl.where(v <= 0.0, 0.0, g * (v * invd)))


@triton.jit
def _forward_kernel(x_ptr, y_ptr, n, delta, half, inv2d, F64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    v = _load(x_ptr, offs, mask, F64)
    d = _const(delta, F64)
    y = tl.where(v >= d, v - _const(half, F64), tl.where(v <= 0.0, 0.0, v * v * _const(inv2d, F64)))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, out_ptr, n, delta, invd, F64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    v = _load(x_ptr, offs, mask, F64)
    g = _load(g_ptr, offs, mask, F64)
    out = _slope_times(g, v, _const(delta, F64), _const(invd, F64))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _double_backward_kernel(
    gg_ptr, g_ptr, x_ptr, a_ptr, b_ptr, n, delta, invd, F64: tl.constexpr, BLOCK: tl.constexpr
):
    offs, mask = _offsets(n, BLOCK)
    v = _load(x_ptr, offs, mask, F64)
    g = _load(g_ptr, offs, mask, F64)
    gg = _load(gg_ptr, offs, mask, F64)
    d = _const(delta, F64)
    k = _const(invd, F64)
    a = _slope_times(gg, v, d, k)
    b = tl.where((v > 0.0) & (v < d), gg * g * k, 0.0)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, _BLOCK),)


@triton_op("pyadvk::half_huber_relu_triton", mutates_args=())
def half_huber_relu_triton(x: torch.Tensor, delta: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        d, half, _, inv2d = ops.constants(delta)
        wrap_triton(_forward_kernel)[_grid(n)](
            x, y, n, d, half, inv2d, F64=x.dtype == torch.float64, BLOCK=_BLOCK
        )
    return y


@triton_op("pyadvk::half_huber_relu_backward_triton", mutates_args=())
def half_huber_relu_backward_triton(grad: torch.Tensor, x: torch.Tensor, delta: float) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        d, _, invd, _ = ops.constants(delta)
        wrap_triton(_backward_kernel)[_grid(n)](
            grad, x, out, n, d, invd, F64=x.dtype == torch.float64, BLOCK=_BLOCK
        )
    return out


@triton_op("pyadvk::half_huber_relu_double_backward_triton", mutates_args=())
def half_huber_relu_double_backward_triton(
    gg: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    d_grad = torch.empty_like(x)
    d_x = torch.empty_like(x)
    n = x.numel()
    if n:
        d, _, invd, _ = ops.constants(delta)
        wrap_triton(_double_backward_kernel)[_grid(n)](
            gg, grad, x, d_grad, d_x, n, d, invd, F64=x.dtype == torch.float64, BLOCK=_BLOCK
        )
    return d_grad, d_x


ops.register_triton_autograd()
