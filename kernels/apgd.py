"""Triton bodies of the fused APGD step (pyadvk/ops/apgd.py defines it; csrc/apgd.h explains the
passes).

Each program owns one tile of BLOCK values inside one sample, so per-sample eta/eps are loaded once
per program. linf is one kernel. l2 is four, each writing per-tile partial sums in float64
(float32 squares under/overflow for gradients beyond 1e+-19) that the later ones combine per sample:
|g|^2; |d1|^2 of z's float32 offset d1 = x + eta g/|g| - x_orig; |w - x_orig|^2 of the momentum
point w; then the write. The linf kernel is autotuned per size class (kernels/_common.py).
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
    max_nan,
    min_nan,
    on_device_of,
    per_sample_value,
    plan,
    sample_sum,
    size_class,
    tile,
    unfused,
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
def _l2_gg_kernel(g_ptr, gg_ptr, D, BLOCK: tl.constexpr):
    """Pass 1: this tile's |g|^2 in float64 (g without NaN)."""
    _, offs, mask = tile(D, BLOCK)
    g = _load(g_ptr, offs, mask)
    g = tl.where(g != g, 0.0, g).to(tl.float64)
    tl.store(gg_ptr + tl.program_id(0).to(tl.int64), tl.sum(g * g, axis=0))


@triton.jit
def _gdiv(gg_ptr, b, per_sample, PARTIAL_BLOCK: tl.constexpr):
    """Sample b's |g| in float64 (1 where |g| = 0: then g = 0)."""
    gn = tl.sqrt(sample_sum(gg_ptr, b, per_sample, PARTIAL_BLOCK))
    return tl.where(gn > 0, gn, 1.0)


@triton.jit
def _d1(x, xo, g, gdiv, h):
    """z's offset d1 = x + eta g/|g| - x_orig as the torch body: g/|g| in float64 rounded to
    float32, the rest in float32 (g without NaN)."""
    q = (tl.where(g != g, 0.0, g).to(tl.float64) / gdiv).to(tl.float32)
    return (x + h * q) - xo


@triton.jit
def _l2_d1_kernel(
    x_ptr,
    xo_ptr,
    g_ptr,
    gg_ptr,
    dd1_ptr,
    eta_ptr,
    D,
    per_sample,
    eta,
    HAS_ETA_T: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,
):
    """Pass 2: this tile's |d1|^2 (float64) from the float32 d1."""
    b, offs, mask = tile(D, BLOCK)
    h = per_sample_value(eta_ptr, b, eta, HAS_ETA_T, tl.float32)
    gdiv = _gdiv(gg_ptr, b, per_sample, PARTIAL_BLOCK)
    d1 = _d1(_load(x_ptr, offs, mask), _load(xo_ptr, offs, mask), _load(g_ptr, offs, mask), gdiv, h)
    d1 = tl.where(mask, d1, 0.0).to(tl.float64)
    tl.store(dd1_ptr + tl.program_id(0).to(tl.int64), tl.sum(d1 * d1, axis=0))


@triton.jit
def _first_scalars(gg_ptr, dd1_ptr, b, per_sample, e, PARTIAL_BLOCK: tl.constexpr):
    """Sample b's |g| (float64, 1 where 0) and z's projection factor (float32; 1 for a NaN norm or
    an infinite |g|, as the reference's NaN norm)."""
    gg = sample_sum(gg_ptr, b, per_sample, PARTIAL_BLOCK)
    gn = tl.sqrt(gg)
    dn = tl.sqrt(sample_sum(dd1_ptr, b, per_sample, PARTIAL_BLOCK))
    finite = (gn - gn) == 0.0
    f1 = tl.where((dn > e) & finite, e / tl.where(dn > 0, dn, 1.0), 1.0).to(tl.float32)
    return tl.where(gn > 0, gn, 1.0), f1


@triton.jit
def _momentum_point(x, xp, xo, g, gdiv, f1, h, m, r, lo, hi):
    z = clamp_nan(xo + _d1(x, xo, g, gdiv, h) * f1, lo, hi)
    return (x + m * (z - x)) + r * (x - xp)


@triton.jit
def _l2_second_kernel(
    x_ptr,
    xp_ptr,
    xo_ptr,
    g_ptr,
    gg_ptr,
    dd1_ptr,
    dd2_ptr,
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
    """Pass 3: this tile's |w - x_orig|^2 (float64) of the momentum point w."""
    b, offs, mask = tile(D, BLOCK)
    h = per_sample_value(eta_ptr, b, eta, HAS_ETA_T, tl.float32)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float64)
    gdiv, f1 = _first_scalars(gg_ptr, dd1_ptr, b, per_sample, e, PARTIAL_BLOCK)
    m, r = tl.cast(momentum, tl.float32), tl.cast(rest, tl.float32)
    lo, hi = tl.cast(lower, tl.float32), tl.cast(upper, tl.float32)
    xo = _load(xo_ptr, offs, mask)
    w = _momentum_point(
        _load(x_ptr, offs, mask), _load(xp_ptr, offs, mask), xo, _load(g_ptr, offs, mask), gdiv, f1, h, m, r, lo, hi
    )
    d2 = tl.where(mask, w - xo, 0.0).to(tl.float64)
    tl.store(dd2_ptr + tl.program_id(0).to(tl.int64), tl.sum(d2 * d2, axis=0))


@triton.jit
def _l2_write_kernel(
    x_ptr,
    xp_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    gg_ptr,
    dd1_ptr,
    dd2_ptr,
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
    """Pass 4: y = clamp(x_orig + (w - x_orig) min(1, eps/|w - x_orig|))."""
    b, offs, mask = tile(D, BLOCK)
    h = per_sample_value(eta_ptr, b, eta, HAS_ETA_T, tl.float32)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float64)
    gdiv, f1 = _first_scalars(gg_ptr, dd1_ptr, b, per_sample, e, PARTIAL_BLOCK)
    dn = tl.sqrt(sample_sum(dd2_ptr, b, per_sample, PARTIAL_BLOCK))
    f2 = tl.where(dn > e, e / tl.where(dn > 0, dn, 1.0), 1.0).to(tl.float32)  # NaN: 1
    m, r = tl.cast(momentum, tl.float32), tl.cast(rest, tl.float32)
    lo, hi = tl.cast(lower, tl.float32), tl.cast(upper, tl.float32)
    xo = _load(xo_ptr, offs, mask)
    w = _momentum_point(
        _load(x_ptr, offs, mask), _load(xp_ptr, offs, mask), xo, _load(g_ptr, offs, mask), gdiv, f1, h, m, r, lo, hi
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
            linf_grid = lambda meta: (B * triton.cdiv(D, meta["BLOCK"]),)  # noqa: E731
            linf_args = (x, x_prev, x_orig, grad, out, eta_ptr, eps_ptr, D, *scalars, size_class(x.numel()))
            wrap_triton(_linf_kernel)[linf_grid](*linf_args, **flags, **unfused(x))
            return
        D, per_sample, block = plan(x)
        grid = (B * per_sample,)
        gg, dd1, dd2 = torch.empty(3, grid[0], device=x.device, dtype=torch.float64)  # one allocation per step
        sizes = dict(BLOCK=block, PARTIAL_BLOCK=PARTIAL_BLOCK)
        wrap_triton(_l2_gg_kernel)[grid](grad, gg, D, BLOCK=block, **unfused(x))
        wrap_triton(_l2_d1_kernel)[grid](
            x, x_orig, grad, gg, dd1, eta_ptr, D, per_sample, eta, HAS_ETA_T=eta_t is not None, **sizes, **unfused(x)
        )
        points = (x, x_prev, x_orig, grad)
        args = (eta_ptr, eps_ptr, D, per_sample, *scalars)
        wrap_triton(_l2_second_kernel)[grid](*points, gg, dd1, dd2, *args, **flags, **sizes, **unfused(x))
        wrap_triton(_l2_write_kernel)[grid](*points, out, gg, dd1, dd2, *args, **flags, **sizes, **unfused(x))


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
