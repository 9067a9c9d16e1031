"""Triton bodies of the fused PGD ops (pyadvk/ops/pgd.py defines them).

Each program owns one tile of BLOCK values inside one sample, so per-sample eps/alpha are loaded
once per program. linf is one kernel; l2 is a reduction writing per-tile partial sums of |g|^2,
|x_adv - x_orig|^2 and <x_adv - x_orig, g>, then an elementwise kernel that combines its sample's
partials: |d|^2 = pp + 2 s pg + s^2 gg with s = alpha/|g|, so d needs no second reduction.
Registered with torch.library.triton_op, so torch.compile sees through them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_PARTIAL_BLOCK = 128


@triton.jit
def _tile(D, per_sample, BLOCK: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    b = tile // per_sample
    idx = (tile - b * per_sample) * BLOCK + tl.arange(0, BLOCK)
    return b, b * D + idx, idx < D


@triton.jit
def _per_sample(ptr, b, scalar, HAS_TENSOR: tl.constexpr):
    if HAS_TENSOR:
        value = tl.load(ptr + b)
    else:
        value = tl.cast(scalar, tl.float32)
    return value


@triton.jit
def _linf_step_kernel(
    xa_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    eps_ptr,
    alpha_ptr,
    D,
    per_sample,
    eps,
    alpha,
    lower,
    upper,
    HAS_EPS_T: tl.constexpr,
    HAS_ALPHA_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, offs, mask = _tile(D, per_sample, BLOCK)
    e = _per_sample(eps_ptr, b, eps, HAS_EPS_T)
    a = _per_sample(alpha_ptr, b, alpha, HAS_ALPHA_T)
    xa = tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(xo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    step = tl.where(g > 0, a, tl.where(g < 0, -a, 0.0))  # NaN -> no step
    v = tl.minimum(tl.maximum(xa + step, xo - e), xo + e)
    v = tl.minimum(tl.maximum(v, tl.cast(lower, tl.float32)), tl.cast(upper, tl.float32))
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_reduce_kernel(xa_ptr, xo_ptr, g_ptr, partial_ptr, D, per_sample, BLOCK: tl.constexpr):
    _, offs, mask = _tile(D, per_sample, BLOCK)
    xa = tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(xo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # sums in float64: float32 squares of gradients beyond ~1e19 overflow and below ~1e-19 underflow
    g = tl.where(g != g, 0.0, g).to(tl.float64)
    p = (xa - xo).to(tl.float64)
    out = partial_ptr + tl.program_id(0).to(tl.int64) * 3
    tl.store(out, tl.sum(g * g, axis=0))
    tl.store(out + 1, tl.sum(p * p, axis=0))
    tl.store(out + 2, tl.sum(p * g, axis=0))


@triton.jit
def _l2_apply_kernel(
    xa_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    partial_ptr,
    eps_ptr,
    alpha_ptr,
    D,
    per_sample,
    eps,
    alpha,
    lower,
    upper,
    HAS_EPS_T: tl.constexpr,
    HAS_ALPHA_T: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,
):
    b, offs, mask = _tile(D, per_sample, BLOCK)
    gg = tl.zeros([PARTIAL_BLOCK], tl.float64)
    pp = tl.zeros([PARTIAL_BLOCK], tl.float64)
    pg = tl.zeros([PARTIAL_BLOCK], tl.float64)
    for start in range(0, per_sample, PARTIAL_BLOCK):
        c = start + tl.arange(0, PARTIAL_BLOCK)
        src = partial_ptr + (b * per_sample + c) * 3
        cm = c < per_sample
        gg += tl.load(src, mask=cm, other=0.0)
        pp += tl.load(src + 1, mask=cm, other=0.0)
        pg += tl.load(src + 2, mask=cm, other=0.0)
    gg_s = tl.sum(gg, axis=0)
    e = _per_sample(eps_ptr, b, eps, HAS_EPS_T)
    gn = tl.sqrt(gg_s)
    a = tl.where(gn > 0, _per_sample(alpha_ptr, b, alpha, HAS_ALPHA_T), 0.0)
    gdiv = tl.where(gn > 0, gn, 1.0)
    s = a.to(tl.float64) / gdiv
    dd = tl.sum(pp, axis=0) + 2.0 * s * tl.sum(pg, axis=0) + s * s * gg_s
    dn = tl.sqrt(tl.maximum(dd, 0.0))
    f = tl.where(dn > e, e / dn, 1.0).to(tl.float32)
    xa = tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(xo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(g != g, 0.0, g)
    d = (xa + a.to(tl.float32) * (g.to(tl.float64) / gdiv).to(tl.float32)) - xo
    v = tl.minimum(tl.maximum(xo + d * f, tl.cast(lower, tl.float32)), tl.cast(upper, tl.float32))
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linf_init_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    eps_ptr,
    D,
    per_sample,
    eps,
    lower,
    upper,
    HAS_EPS_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, offs, mask = _tile(D, per_sample, BLOCK)
    e = _per_sample(eps_ptr, b, eps, HAS_EPS_T)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    v = tl.minimum(tl.maximum(x + e * (2.0 * u - 1.0), tl.cast(lower, tl.float32)), tl.cast(upper, tl.float32))
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _plan(x: torch.Tensor) -> tuple[int, int, int]:
    """(D, per_sample, BLOCK): values per sample, tiles per sample, tile size."""
    D = x.numel() // x.shape[0]
    block = max(128, min(4096, triton.next_power_of_2(D)))
    return D, triton.cdiv(D, block), block


def _launch_step(norm, x_adv, x_orig, grad, eps, alpha, eps_t, alpha_t, lower, upper, out) -> None:
    if x_adv.numel() == 0:
        return
    D, per_sample, block = _plan(x_adv)
    grid = (x_adv.shape[0] * per_sample,)
    flags = dict(HAS_EPS_T=eps_t is not None, HAS_ALPHA_T=alpha_t is not None, BLOCK=block)
    eps_ptr = eps_t if eps_t is not None else x_adv  # never read when the flag is off
    alpha_ptr = alpha_t if alpha_t is not None else x_adv
    if norm == "linf":
        wrap_triton(_linf_step_kernel)[grid](
            x_adv,
            x_orig,
            grad,
            out,
            eps_ptr,
            alpha_ptr,
            D,
            per_sample,
            eps,
            alpha,
            lower,
            upper,
            **flags,
        )
        return
    partial = torch.empty(grid[0] * 3, device=x_adv.device, dtype=torch.float64)
    wrap_triton(_l2_reduce_kernel)[grid](x_adv, x_orig, grad, partial, D, per_sample, BLOCK=block)
    wrap_triton(_l2_apply_kernel)[grid](
        x_adv,
        x_orig,
        grad,
        out,
        partial,
        eps_ptr,
        alpha_ptr,
        D,
        per_sample,
        eps,
        alpha,
        lower,
        upper,
        PARTIAL_BLOCK=_PARTIAL_BLOCK,
        **flags,
    )


def _register_step(norm: str) -> None:
    @triton_op(f"pyadvk::pgd_step_{norm}_triton", mutates_args=())
    def step(
        x_adv: torch.Tensor,
        x_orig: torch.Tensor,
        grad: torch.Tensor,
        eps: float,
        alpha: float,
        eps_per_sample: Optional[torch.Tensor],
        alpha_per_sample: Optional[torch.Tensor],
        lower: float,
        upper: float,
    ) -> torch.Tensor:
        out = torch.empty_like(x_adv)
        _launch_step(norm, x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper, out)
        return out

    @triton_op(f"pyadvk::pgd_step_{norm}_triton_", mutates_args={"x_adv"})
    def step_(
        x_adv: torch.Tensor,
        x_orig: torch.Tensor,
        grad: torch.Tensor,
        eps: float,
        alpha: float,
        eps_per_sample: Optional[torch.Tensor],
        alpha_per_sample: Optional[torch.Tensor],
        lower: float,
        upper: float,
    ) -> None:
        _launch_step(norm, x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper, x_adv)


for _norm in ("linf", "l2"):
    _register_step(_norm)


@triton_op("pyadvk::random_init_linf_triton", mutates_args=())
def random_init_linf_triton(
    x: torch.Tensor,
    noise: torch.Tensor,
    eps: float,
    eps_per_sample: Optional[torch.Tensor],
    lower: float,
    upper: float,
) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    D, per_sample, block = _plan(x)
    eps_ptr = eps_per_sample if eps_per_sample is not None else noise
    wrap_triton(_linf_init_kernel)[(x.shape[0] * per_sample,)](
        x,
        noise,
        out,
        eps_ptr,
        D,
        per_sample,
        eps,
        lower,
        upper,
        HAS_EPS_T=eps_per_sample is not None,
        BLOCK=block,
    )
    return out
