"""Triton bodies of the fused PGD ops (pyadvk/ops/pgd.py defines them):
``pyadvk::pgd_step_linf_triton``, ``pgd_step_linf_triton_``, ``pgd_step_l2_triton``,
``pgd_step_l2_triton_`` and ``random_init_linf_triton``.

Each program owns one tile of BLOCK values inside one sample, so per-sample eps/alpha are loaded
once per program. linf (and the linf random start) is one elementwise kernel, autotuned per size
class (kernels/_common.py). l2 is three kernels: per-tile partial sums of |g|^2 in float64; per-tile
|d|^2 of the float32 d that the write computes (each program combining its sample's |g|^2 first);
the write, combining both. (|d|^2 expanded in first-pass sums would save the second reading of
x_adv and x_orig but cancels where the step is much larger than d, and misses d's float rounding,
which is part of the op.)
min/max/clamp propagate NaN as torch's do. Launches run on the tensors' device. Registered with
torch.library.triton_op, so torch.compile sees through them.
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
    load_f32,
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


@triton.autotune(ELEMENTWISE_CONFIGS, key=["size_class"], restore_value=["out_ptr"], do_bench=benchmark)
@triton.jit
def _linf_step_kernel(
    xa_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    eps_ptr,
    alpha_ptr,
    D,
    eps,
    alpha,
    lower,
    upper,
    size_class,
    HAS_EPS_T: tl.constexpr,
    HAS_ALPHA_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, offs, mask = tile(D, BLOCK)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float32)
    a = per_sample_value(alpha_ptr, b, alpha, HAS_ALPHA_T, tl.float32)
    xa = load_f32(xa_ptr, offs, mask)
    xo = load_f32(xo_ptr, offs, mask)
    g = load_f32(g_ptr, offs, mask)
    step = tl.where(g > 0, a, tl.where(g < 0, -a, 0.0))  # NaN -> no step
    v = min_nan(max_nan(xa + step, xo - e), xo + e)
    v = clamp_nan(v, tl.cast(lower, tl.float32), tl.cast(upper, tl.float32))
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_gg_kernel(g_ptr, partial_ptr, D, BLOCK: tl.constexpr):
    """Pass 1: this tile's |g|^2 (float64: float32 squares of gradients beyond ~1e19 overflow and
    below ~1e-19 underflow; g without NaN)."""
    _, offs, mask = tile(D, BLOCK)
    g = load_f32(g_ptr, offs, mask)
    g = tl.where(g != g, 0.0, g).to(tl.float64)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64), tl.sum(g * g, axis=0))


@triton.jit
def _l2_direction(xa, xo, g, a, gdiv):
    """d = x_adv + alpha g/|g| - x_orig as the torch body computes it: g/|g| in float64 rounded to
    float32, the rest in float32 (g without NaN; gdiv = |g|, or 1 where |g| = 0)."""
    g = tl.where(g != g, 0.0, g)
    return (xa + a * (g.to(tl.float64) / gdiv).to(tl.float32)) - xo


@triton.jit
def _l2_gdiv(gg_ptr, b, per_sample, PARTIAL_BLOCK: tl.constexpr):
    gn = tl.sqrt(sample_sum(gg_ptr, b, per_sample, PARTIAL_BLOCK))
    return tl.where(gn > 0, gn, 1.0)


@triton.jit
def _l2_dd_kernel(
    xa_ptr,
    xo_ptr,
    g_ptr,
    gg_ptr,
    dd_ptr,
    alpha_ptr,
    D,
    per_sample,
    alpha,
    HAS_ALPHA_T: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,
):
    """Pass 2: this tile's |d|^2 (float64) from the float32 d that the write computes."""
    b, offs, mask = tile(D, BLOCK)
    gdiv = _l2_gdiv(gg_ptr, b, per_sample, PARTIAL_BLOCK)
    a = per_sample_value(alpha_ptr, b, alpha, HAS_ALPHA_T, tl.float32)
    d = _l2_direction(load_f32(xa_ptr, offs, mask), load_f32(xo_ptr, offs, mask), load_f32(g_ptr, offs, mask), a, gdiv)
    d = tl.where(mask, d, 0.0).to(tl.float64)
    tl.store(dd_ptr + tl.program_id(0).to(tl.int64), tl.sum(d * d, axis=0))


@triton.jit
def _l2_apply_kernel(
    xa_ptr,
    xo_ptr,
    g_ptr,
    out_ptr,
    gg_ptr,
    dd_ptr,
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
    """Pass 3: the write, y = clamp(x_orig + d min(1, eps/|d|))."""
    b, offs, mask = tile(D, BLOCK)
    gdiv = _l2_gdiv(gg_ptr, b, per_sample, PARTIAL_BLOCK)
    dn = tl.sqrt(sample_sum(dd_ptr, b, per_sample, PARTIAL_BLOCK))
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float32)
    f = tl.where(dn > e, e / dn, 1.0).to(tl.float32)  # NaN: 1 (no projection, as the reference)
    a = per_sample_value(alpha_ptr, b, alpha, HAS_ALPHA_T, tl.float32)
    xo = load_f32(xo_ptr, offs, mask)
    d = _l2_direction(load_f32(xa_ptr, offs, mask), xo, load_f32(g_ptr, offs, mask), a, gdiv)
    v = clamp_nan(xo + d * f, tl.cast(lower, tl.float32), tl.cast(upper, tl.float32))
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(ELEMENTWISE_CONFIGS, key=["size_class"], do_bench=benchmark)
@triton.jit
def _linf_init_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    eps_ptr,
    D,
    eps,
    lower,
    upper,
    size_class,
    HAS_EPS_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, offs, mask = tile(D, BLOCK)
    e = per_sample_value(eps_ptr, b, eps, HAS_EPS_T, tl.float32)
    x = load_f32(x_ptr, offs, mask)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    v = clamp_nan(x + e * (2.0 * u - 1.0), tl.cast(lower, tl.float32), tl.cast(upper, tl.float32))
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(B: int, D: int):
    """The grid of an autotuned per-sample launch: B samples of cdiv(D, BLOCK) tiles."""
    return lambda meta: (B * triton.cdiv(D, meta["BLOCK"]),)


def _launch_step(linf: bool, x_adv, x_orig, grad, eps, alpha, eps_t, alpha_t, lower, upper, out) -> None:
    """Writes the step into ``out`` (which may be ``x_adv``); nothing to launch for no values."""
    if x_adv.numel() == 0:
        return
    B = x_adv.shape[0]
    flags = dict(HAS_EPS_T=eps_t is not None, HAS_ALPHA_T=alpha_t is not None)
    eps_ptr = eps_t if eps_t is not None else x_adv  # never read when the flag is off
    alpha_ptr = alpha_t if alpha_t is not None else x_adv
    with on_device_of(x_adv):
        if linf:
            D = x_adv.numel() // B
            wrap_triton(_linf_step_kernel)[_tiles(B, D)](
                x_adv,
                x_orig,
                grad,
                out,
                eps_ptr,
                alpha_ptr,
                D,
                eps,
                alpha,
                lower,
                upper,
                size_class(x_adv.numel()),
                **flags,
                **unfused(x_adv),
            )
            return
        D, per_sample, block = plan(x_adv)
        grid = (B * per_sample,)
        gg, dd = torch.empty(2, grid[0], device=x_adv.device, dtype=torch.float64)  # one allocation per step
        sizes = dict(BLOCK=block, PARTIAL_BLOCK=PARTIAL_BLOCK)
        wrap_triton(_l2_gg_kernel)[grid](grad, gg, D, BLOCK=block, **unfused(x_adv))
        wrap_triton(_l2_dd_kernel)[grid](
            x_adv,
            x_orig,
            grad,
            gg,
            dd,
            alpha_ptr,
            D,
            per_sample,
            alpha,
            HAS_ALPHA_T=alpha_t is not None,
            **sizes,
            **unfused(x_adv),
        )
        wrap_triton(_l2_apply_kernel)[grid](
            x_adv,
            x_orig,
            grad,
            out,
            gg,
            dd,
            eps_ptr,
            alpha_ptr,
            D,
            per_sample,
            eps,
            alpha,
            lower,
            upper,
            **flags,
            **sizes,
            **unfused(x_adv),
        )


def _register_step(linf: bool, name: str, inplace_name: str) -> None:
    """Registers the out-of-place and in-place Triton ops of one norm (names written out at the
    calls below, so that grep finds them)."""

    @triton_op(name, mutates_args=())
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
        _launch_step(linf, x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper, out)
        return out

    @triton_op(inplace_name, mutates_args={"x_adv"})
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
        _launch_step(linf, x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper, x_adv)


_register_step(True, "pyadvk::pgd_step_linf_triton", "pyadvk::pgd_step_linf_triton_")
_register_step(False, "pyadvk::pgd_step_l2_triton", "pyadvk::pgd_step_l2_triton_")


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
    B = x.shape[0]
    D = x.numel() // B
    eps_ptr = eps_per_sample if eps_per_sample is not None else noise
    with on_device_of(x):
        wrap_triton(_linf_init_kernel)[_tiles(B, D)](
            x,
            noise,
            out,
            eps_ptr,
            D,
            eps,
            lower,
            upper,
            size_class(x.numel()),
            HAS_EPS_T=eps_per_sample is not None,
            **unfused(x),
        )
    return out
