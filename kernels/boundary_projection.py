"""Triton body of the boundary projection (pyadvk/ops/boundary_projection.py defines it;
csrc/boundary_projection.h explains the search).

One program per row, tiles of BLOCK values over the row, float64 arithmetic. Passes: r = w·x + b;
the sums at t = inf and t = 0; one per probe of the search, each accumulating per-lane
``A(t) = Σ_{τ_i<=t} v_i τ_i``, ``B(t) = Σ_{τ_i>t} v_i``, the partition's size and the breakpoints
nearest ``t`` on both sides, reduced once at the end of the pass (a fixed order: deterministic);
then the write of δ. The search (as csrc/boundary_projection.h's BoundarySearch) keeps a bracket
[lo, hi], probes the middle of the tangent and chord crossings of ``g(t) = A + t·B`` with ``|r|``,
and stops as soon as the segment of g around a probe holds the crossing, else after 64 probes. The
box bounds travel as a float64 tensor (Triton passes Python floats as float32). Registered with
torch.library.triton_op as ``pyadvk::boundary_projection_triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pyadvk.kernels._common import on_device_of, unfused

MAX_PROBES = 64  # as boundary::kMaxProbes (csrc/boundary_projection.h)


@triton.jit
def _breakpoints(x, w, s, lower, upper, L2: tl.constexpr):
    """(ws, active, v, tau) of a tile: ws = s·w, the coordinates with w != 0, weights, breakpoints."""
    ws = w * s
    a = tl.abs(ws)
    active = ws != 0
    reach = tl.where(ws > 0, upper - x, x - lower)
    reach = tl.where(reach < 0, 0.0, reach)
    if L2:
        v = ws * ws
        tau = reach / tl.where(active, a, 1.0)
    else:
        v = a
        tau = reach
    return ws, active, v, tau


@triton.jit
def _load_row(x_ptr, w_ptr, base, start, D, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
    w = tl.load(w_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
    return x, w, mask, offs


@triton.jit
def _probe(x_ptr, w_ptr, base, D, s, lower, upper, t, L2: tl.constexpr, BLOCK: tl.constexpr):
    """(A, B, V, n, below_max, above_min) at t, as boundary::ProbeSums."""
    acc_a = tl.zeros([BLOCK], tl.float64)
    acc_b = tl.zeros([BLOCK], tl.float64)
    acc_v = tl.zeros([BLOCK], tl.float64)
    acc_n = tl.zeros([BLOCK], tl.int64)
    below_max = tl.full([BLOCK], float("-inf"), tl.float64)
    above_min = tl.full([BLOCK], float("inf"), tl.float64)
    for start in range(0, D, BLOCK):
        x, w, mask, offs = _load_row(x_ptr, w_ptr, base, start, D, BLOCK)
        ws, active, v, tau = _breakpoints(x, w, s, lower, upper, L2)
        active = active & mask
        le = active & (tau <= t)
        gt = active & (tau > t)
        acc_a += tl.where(le, v * tau, 0.0)
        acc_v += tl.where(le, v, 0.0)
        acc_n += le.to(tl.int64)
        below_max = tl.where(le & (tau > below_max), tau, below_max)
        acc_b += tl.where(gt, v, 0.0)
        above_min = tl.where(gt & (tau < above_min), tau, above_min)
    return (
        tl.sum(acc_a, axis=0),
        tl.sum(acc_b, axis=0),
        tl.sum(acc_v, axis=0),
        tl.sum(acc_n, axis=0),
        tl.max(below_max, axis=0),
        tl.min(above_min, axis=0),
    )


@triton.jit
def _g(a, b, t):
    """A + t·B, the value of g at t on the segment of a partition, without inf·0 = NaN: A where B = 0."""
    return tl.where(b > 0, a + tl.where(b > 0, t, 0.0) * b, a)


@triton.jit
def _kernel(
    x_ptr, w_ptr, b_ptr, bounds_ptr, out_ptr, D, L2: tl.constexpr, BLOCK: tl.constexpr, MAX_PROBES: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    lower = tl.load(bounds_ptr)
    upper = tl.load(bounds_ptr + 1)
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, D, BLOCK):
        x, w, mask, offs = _load_row(x_ptr, w_ptr, base, start, D, BLOCK)
        acc += x * w
    r = tl.sum(acc, axis=0) + tl.load(b_ptr + row).to(tl.float64)
    s = tl.where(r > 0, -1.0, 1.0).to(tl.float64)
    target = tl.abs(r)
    inf = float("inf")
    a_inf, b_inf, v_inf, n_inf, below_inf, above_inf = _probe(x_ptr, w_ptr, base, D, s, lower, upper, inf, L2, BLOCK)
    a_lo, b_lo, v_zero, n_lo, below_zero, above_zero = _probe(x_ptr, w_ptr, base, D, s, lower, upper, 0.0, L2, BLOCK)
    total = v_inf + b_inf
    is_nan = target != target
    misses = (total <= 0) | (a_inf < target)  # w = 0, or the hyperplane misses the box
    decided = is_nan | misses | (target == 0)
    fixed = tl.where(is_nan, target, tl.where(misses, inf, 0.0))
    lo_t = tl.zeros([], tl.float64)
    hi_t = below_inf
    a_hi = a_inf  # every breakpoint <= hi_t: g(hi_t) = g(inf)
    b_hi = tl.zeros([], tl.float64)
    done = decided | (n_lo == n_inf) | (_g(a_lo, b_lo, above_zero) >= target)
    probes = 0
    while done == 0:
        # the middle of [tangent crossing, chord crossing] within (lo, hi), else of [lo, hi]
        g_lo = a_lo + lo_t * b_lo
        g_hi = a_hi + hi_t * b_hi
        tangent = lo_t + (target - g_lo) / b_lo
        chord = tl.where(g_hi > g_lo, lo_t + (target - g_lo) * ((hi_t - lo_t) / (g_hi - g_lo)), hi_t)
        t = 0.5 * (tl.where(tangent > lo_t, tangent, lo_t) + tl.where(chord < hi_t, chord, hi_t))
        t = tl.where((t > lo_t) & (t < hi_t), t, lo_t + 0.5 * (hi_t - lo_t))
        p_a, p_b, p_v, p_n, p_below, p_above = _probe(x_ptr, w_ptr, base, D, s, lower, upper, t, L2, BLOCK)
        probes += 1
        lower_side = p_a + t * p_b < target
        take_t = (lower_side == 0) & (p_n > n_lo) & (_g(p_a, p_b, p_below) < target)
        use_p = lower_side | take_t
        stop = tl.where(lower_side, _g(p_a, p_b, p_above) >= target, take_t | (p_n == n_lo))
        a_lo = tl.where(use_p, p_a, a_lo)
        b_lo = tl.where(use_p, p_b, b_lo)
        n_lo = tl.where(use_p, p_n, n_lo)
        lo_t = tl.where(lower_side, t, lo_t)
        hi_t = tl.where(lower_side, hi_t, t)
        a_hi = tl.where(lower_side, a_hi, p_a)
        b_hi = tl.where(lower_side, b_hi, p_b)
        nxt = lo_t + 0.5 * (hi_t - lo_t)
        done = stop | (probes >= MAX_PROBES) | (nxt <= lo_t) | (nxt >= hi_t)
    tau = tl.where(decided, fixed, tl.where(b_lo > 0, (target - a_lo) / tl.where(b_lo > 0, b_lo, 1.0), inf))
    tau_nan = tau != tau
    for start in range(0, D, BLOCK):
        x, w, mask, offs = _load_row(x_ptr, w_ptr, base, start, D, BLOCK)
        ws, active, v, tau_i = _breakpoints(x, w, s, lower, upper, L2)
        step = tl.where(tau_nan, tau, tl.where(tau < tau_i, tau, tau_i))  # torch.minimum: NaN propagates
        if L2:
            delta = ws * step
        else:
            delta = tl.where(ws > 0, step, -step)
        delta = tl.where(active, delta, 0.0)
        tl.store(out_ptr + base + offs, delta.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("pyadvk::boundary_projection_triton", mutates_args=())
def boundary_projection_triton(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lower: float, upper: float, norm: str
) -> torch.Tensor:
    """The boundary projection of (R, D) contiguous rows (checked by the Python wrapper)."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out.zero_()
    rows, dims = x.shape
    bounds = torch.tensor([lower, upper], dtype=torch.float64, device=x.device)
    block = max(16, min(1024, triton.next_power_of_2(dims)))
    with on_device_of(x):
        wrap_triton(_kernel)[(rows,)](
            x, w, b, bounds, out, dims, L2=norm == "l2", BLOCK=block, MAX_PROBES=MAX_PROBES, num_warps=4, **unfused(x)
        )
    return out
