"""Triton bodies of the fused APGD step (pyadvk/ops/apgd.py defines it; csrc/apgd.h explains the
passes).

Each program owns one tile of BLOCK values inside one sample, so per-sample eta/eps are loaded once
per program. linf is one kernel. l2 is three: per-tile partial sums of |g|^2, |x - x_orig|^2 and
<x - x_orig, g> in float64 (float32 squares under/overflow for gradients beyond 1e+-19); then per
tile |w - x_orig|^2 of the momentum point w, each program first combining its sample's pass-1
partials into |g| and z's projection factor (|x + c g - x_orig|^2 = pp + 2 c pg + c^2 gg with
c = eta/|g|); then the write. The linf kernel is autotuned per size class (kernels/_common.py).
min/max/clamp propagate NaN as torch's do. Launches run on the tensors' device. Registered with
torch.library.triton_op (``pyadvk::apgd_step_linf_triton``, ``apgd_step_linf_triton_``,
``apgd_step_l2_triton``, ``apgd_step_l2_triton_``), so torch.compile sees through them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pyadvk.kernels._common import (
    ELEMENTWISE_CONFIGS,
    PARTIAL_BLOCK,
    benchmark,
    clamp_nan,
    expanded_square_norm,
    max_nan,
    min_nan,
    on_device_of,
    per_sample_value,
    plan,
    size_class,
    tile,
)
from pyadvk.kernels._common import load_f32 as _load


@triton.autotune(ELEMENTWISE_CONFIGS, key=["size_class"], restore_value=["out_ptr"], do_bench=benchmark)
@triton.jit
def _linf_kernel(
    x_ptr,
    xp_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    eta_ptr,
    eps_ptr,
    D,
    eta,
    eps,
    momentum,
    rest,
    lower,
    upper,
    size_class,
    HAS_ETA_T: tl.constexpr,
    HAS_EPS_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, offs, mask = tile(D, BLOCK)
    h = per_sample_value(eta_ptr, b, eta, HAS_ETA_T, tl.float32)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float32)
    m, r = tl.cast(momentum, tl.float32), tl.cast(rest, tl.float32)
    lo, hi = tl.cast(lower, tl.float32), tl.cast(upper, tl.float32)
    x = _load(x_ptr, offs, mask)
    xp = _load(xp_ptr, offs, mask)
    xo = _load(xo_ptr, offs, mask)
    g = _load(g_ptr, offs, mask)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))  # NaN: 0
    below, above = xo - e, xo + e
    z = clamp_nan(min_nan(max_nan(x + h * sign, below), above), lo, hi)
    w = (x + m * (z - x)) + r * (x - xp)
    y = clamp_nan(min_nan(max_nan(w, below), above), lo, hi)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_first_kernel(x_ptr, xo_ptr, g_ptr, partial_ptr, D, BLOCK: tl.constexpr):
    _, offs, mask = tile(D, BLOCK)
    x = _load(x_ptr, offs, mask).to(tl.float64)
    xo = _load(xo_ptr, offs, mask).to(tl.float64)
    g = _load(g_ptr, offs, mask)
    g = tl.where(g != g, 0.0, g).to(tl.float64)
    p = x - xo
    out = partial_ptr + tl.program_id(0).to(tl.int64) * 3
    tl.store(out, tl.sum(g * g, axis=0))
    tl.store(out + 1, tl.sum(p * p, axis=0))
    tl.store(out + 2, tl.sum(p * g, axis=0))


@triton.jit
def _first_scalars(partial_ptr, b, per_sample, eps, eta, PARTIAL_BLOCK: tl.constexpr):
    """|g| as float32 (1 when |g| = 0) and z's projection factor (float32) of sample b from the
    pass-1 partials."""
    gg = tl.zeros([PARTIAL_BLOCK], tl.float64)
    pp = tl.zeros([PARTIAL_BLOCK], tl.float64)
    pg = tl.zeros([PARTIAL_BLOCK], tl.float64)
    for start in range(0, per_sample, PARTIAL_BLOCK):
        c = start + tl.arange(0, PARTIAL_BLOCK)
        cm = c < per_sample
        src = partial_ptr + (b * per_sample + c) * 3
        gg += tl.load(src, mask=cm, other=0.0)
        pp += tl.load(src + 1, mask=cm, other=0.0)
        pg += tl.load(src + 2, mask=cm, other=0.0)
    gg_s = tl.sum(gg, axis=0)
    gn = tl.sqrt(gg_s)
    c = tl.where(gn > 0, eta.to(tl.float64) / tl.where(gn > 0, gn, 1.0), 0.0)
    dd = expanded_square_norm(tl.sum(pp, axis=0), tl.sum(pg, axis=0), gg_s, c)
    dn = tl.sqrt(tl.where(dd > 0, dd, 0.0))
    finite = (gn - gn) == 0.0  # an infinite |g| leaves z unprojected, as the reference's NaN norm does
    f1 = tl.where((dn > eps) & finite, eps / tl.where(dn > 0, dn, 1.0), 1.0).to(tl.float32)
    return tl.where(gn > 0, gn, 1.0).to(tl.float32), f1


@triton.jit
def _momentum_point(x, xp, xo, g, gn, f1, h, m, r, lo, hi):
    g = tl.where(g != g, 0.0, g)
    q = g / gn
    d1 = (x + h * q) - xo
    z = clamp_nan(xo + d1 * f1, lo, hi)
    return (x + m * (z - x)) + r * (x - xp)


@triton.jit
def _l2_second_kernel(
    x_ptr,
    xp_ptr,
    xo_ptr,
    g_ptr,
    partial_ptr,
    partial2_ptr,
    eta_ptr,
    eps_ptr,
    D,
    per_sample,
    eta,
    eps,
    momentum,
    rest,
    lower,
    upper,
    HAS_ETA_T: tl.constexpr,
    HAS_EPS_T: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,
):
    b, offs, mask = tile(D, BLOCK)
    h = per_sample_value(eta_ptr, b, eta, HAS_ETA_T, tl.float32)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float64)
    gn, f1 = _first_scalars(partial_ptr, b, per_sample, e, h, PARTIAL_BLOCK)
    m, r = tl.cast(momentum, tl.float32), tl.cast(rest, tl.float32)
    lo, hi = tl.cast(lower, tl.float32), tl.cast(upper, tl.float32)
    xo = _load(xo_ptr, offs, mask)
    w = _momentum_point(
        _load(x_ptr, offs, mask), _load(xp_ptr, offs, mask), xo, _load(g_ptr, offs, mask), gn, f1, h, m, r, lo, hi
    )
    d2 = tl.where(mask, w - xo, 0.0).to(tl.float64)
    tl.store(partial2_ptr + tl.program_id(0).to(tl.int64), tl.sum(d2 * d2, axis=0))


@triton.jit
def _l2_write_kernel(
    x_ptr,
    xp_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    partial_ptr,
    partial2_ptr,
    eta_ptr,
    eps_ptr,
    D,
    per_sample,
    eta,
    eps,
    momentum,
    rest,
    lower,
    upper,
    HAS_ETA_T: tl.constexpr,
    HAS_EPS_T: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,
):
    b, offs, mask = tile(D, BLOCK)
    h = per_sample_value(eta_ptr, b, eta, HAS_ETA_T, tl.float32)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float64)
    gn, f1 = _first_scalars(partial_ptr, b, per_sample, e, h, PARTIAL_BLOCK)
    dd = tl.zeros([PARTIAL_BLOCK], tl.float64)
    for start in range(0, per_sample, PARTIAL_BLOCK):
        c = start + tl.arange(0, PARTIAL_BLOCK)
        dd += tl.load(partial2_ptr + b * per_sample + c, mask=c < per_sample, other=0.0)
    dn = tl.sqrt(tl.sum(dd, axis=0))
    f2 = tl.where(dn > e, e / tl.where(dn > 0, dn, 1.0), 1.0).to(tl.float32)  # NaN: 1
    m, r = tl.cast(momentum, tl.float32), tl.cast(rest, tl.float32)
    lo, hi = tl.cast(lower, tl.float32), tl.cast(upper, tl.float32)
    xo = _load(xo_ptr, offs, mask)
    w = _momentum_point(
        _load(x_ptr, offs, mask), _load(xp_ptr, offs, mask), xo, _load(g_ptr, offs, mask), gn, f1, h, m, r, lo, hi
    )
    y = clamp_nan(xo + (w - xo) * f2, lo, hi)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(linf: bool, x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper, out) -> None:
    """Writes the step into ``out`` (which may be ``x_prev``); nothing to launch for no values."""
    if x.numel() == 0:
        return
    B = x.shape[0]
    eta_ptr = eta_t if eta_t is not None else x  # never read when the flag is off
    eps_ptr = eps_t if eps_t is not None else x
    scalars = (eta, eps, momentum, 1.0 - momentum, lower, upper)
    flags = dict(HAS_ETA_T=eta_t is not None, HAS_EPS_T=eps_t is not None)
    with on_device_of(x):
        if linf:
            D = x.numel() // B
            grid = lambda meta: (B * triton.cdiv(D, meta["BLOCK"]),)  # noqa: E731
            args = (x, x_prev, x_orig, grad, out, eta_ptr, eps_ptr, D, *scalars, size_class(x.numel()))
            wrap_triton(_linf_kernel)[grid](*args, **flags)
            return
        D, per_sample, block = plan(x)
        grid = (B * per_sample,)
        partial = torch.empty(grid[0] * 3, device=x.device, dtype=torch.float64)
        partial2 = torch.empty(grid[0], device=x.device, dtype=torch.float64)
        wrap_triton(_l2_first_kernel)[grid](x, x_orig, grad, partial, D, BLOCK=block)
        flags.update(BLOCK=block, PARTIAL_BLOCK=PARTIAL_BLOCK)
        points = (x, x_prev, x_orig, grad)
        sizes = (D, per_sample, *scalars)
        wrap_triton(_l2_second_kernel)[grid](*points, partial, partial2, eta_ptr, eps_ptr, *sizes, **flags)
        wrap_triton(_l2_write_kernel)[grid](*points, out, partial, partial2, eta_ptr, eps_ptr, *sizes, **flags)


def _register(linf: bool, name: str, inplace_name: str) -> None:
    """Registers the out-of-place and in-place Triton ops of one norm (names written out at the
    calls below, so that grep finds them)."""

    @triton_op(name, mutates_args=())
    def step(
        x: torch.Tensor,
        x_prev: torch.Tensor,
        x_orig: torch.Tensor,
        grad: torch.Tensor,
        eta: float,
        eta_per_sample: Optional[torch.Tensor],
        eps: float,
        eps_per_sample: Optional[torch.Tensor],
        momentum: float,
        lower: float,
        upper: float,
    ) -> torch.Tensor:
        out = torch.empty_like(x)
        _launch(linf, x, x_prev, x_orig, grad, eta, eta_per_sample, eps, eps_per_sample, momentum, lower, upper, out)
        return out

    @triton_op(inplace_name, mutates_args={"x_prev"})
    def step_(
        x: torch.Tensor,
        x_prev: torch.Tensor,
        x_orig: torch.Tensor,
        grad: torch.Tensor,
        eta: float,
        eta_per_sample: Optional[torch.Tensor],
        eps: float,
        eps_per_sample: Optional[torch.Tensor],
        momentum: float,
        lower: float,
        upper: float,
    ) -> None:
        _launch(linf, x, x_prev, x_orig, grad, eta, eta_per_sample, eps, eps_per_sample, momentum, lower, upper, x_prev)


_register(True, "pyadvk::apgd_step_linf_triton", "pyadvk::apgd_step_linf_triton_")
_register(False, "pyadvk::apgd_step_l2_triton", "pyadvk::apgd_step_l2_triton_")
