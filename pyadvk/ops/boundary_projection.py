"""The projection onto a hyperplane inside a box: the step of the minimal-norm attacks FAB and
DeepFool (:mod:`pyadvk.attacks.minimal`).

Where each body lives (one hop from here):

    torch   boundary_projection_reference below (the definition of the op)
    cpp     csrc/boundary_projection.cpp (checks) -> csrc/cpu/boundary_projection_kernels.inc (the
            loops, compiled per instruction set by csrc/cpu/kernels_{default,avx2,avx512}.cpp);
            csrc/boundary_projection.h: BoundaryProjectionArgs and the shared per-row search
    cuda    csrc/cuda/boundary_projection.cu (helpers: csrc/cuda/common.cuh)
    triton  kernels/boundary_projection.py
    tests   tests/test_boundary_projection.py, tests/test_boundary_projection_gpu.py
    bench   benchmarks/bench_boundary_projection.py

For rows ``x``, ``w`` of shape (R, D), offsets ``b`` (R,), a box ``[lower, upper]`` and
``norm`` in {"l2", "linf"}, each row's result is the smallest ``δ`` (in that norm) with
``w·(x + δ) + b = 0`` and ``lower <= x + δ <= upper``, for ``x`` in the box. Write ``r = w·x + b``,
``s = −sign(r)`` (``+1`` where ``r = 0``) and ``w' = s·w``; the problem becomes ``w'·δ = |r|``.
``reach_i`` is ``upper − x_i`` where ``w'_i > 0`` and ``x_i − lower`` where ``w'_i < 0`` (clamped
at 0: how far coordinate ``i`` may move in the useful direction). For a scalar ``τ >= 0``:

* L2: ``δ_i = w'_i·min(τ, τ_i)`` with ``τ_i = reach_i / |w_i|``, ``v_i = w_i²``;
* L∞: ``δ_i = sign(w'_i)·min(τ, τ_i)`` with ``τ_i = reach_i``, ``v_i = |w_i|``;

and ``w'·δ(τ) = g(τ) = Σ_i v_i·min(τ, τ_i)`` (coordinates with ``w_i = 0`` excluded): concave,
piecewise linear and non-decreasing. ``τ`` is where ``g`` reaches ``|r|``: with ``S`` the set of
coordinates whose breakpoint ``τ_i`` lies below the crossing, ``τ = (|r| − Σ_S v_i τ_i) / Σ_∉S
v_i``. If ``|r| > g(∞)`` the hyperplane misses the box and ``τ = ∞``: every coordinate moves to
its bound, the box point closest to the hyperplane along ``w`` (FAB's prescription). Where
``w = 0``, ``δ = 0``. A NaN in a row's ``x``, ``w`` or ``b`` makes ``δ`` NaN at the coordinates
with ``w_i ≠ 0`` (others 0); inputs are otherwise expected finite, with ``x`` in the box.

Every body computes in float64 from the float32 or float64 inputs and rounds ``δ`` to the input
dtype once at the end. The reference finds the crossing by sorting the breakpoints (two cumulative
sums give ``g`` at each); the cpp, cuda and triton bodies need no sort: they search ``τ`` in a
bracket ``[lo, hi]`` with ``g(lo) < |r| <= g(hi)``, each probe one pass over the row summing
``A(τ) = Σ_{τ_i<=τ} v_i τ_i`` and ``B(τ) = Σ_{τ_i>τ} v_i`` (``g(τ) = A + τ·B``). The probe is the
middle of the tangent crossing at ``lo`` and the chord crossing of ``[lo, hi]`` (by concavity they
enclose the answer); the search stops as soon as the segment of ``g`` around a probe holds the
crossing (the nearest breakpoints on both sides come from the same pass), else after 64 probes,
when the closed form is taken on the partition of ``lo``. The partitions agree with the
reference's, so the bodies differ from it only by the order of the float64 sums (far below the
float32 rounding of the result; about 1e-15 relative for float64 inputs).
"""

from __future__ import annotations

import torch

from pyadvk import _backend, _checks
from pyadvk.ops._library import define

NORMS = ("l2", "linf")
DTYPES = (torch.float32, torch.float64)

define("boundary_projection(Tensor x, Tensor w, Tensor b, float lower, float upper, str norm) -> Tensor")


@torch.library.register_fake("pyadvk::boundary_projection")
def _fake(x, w, b, lower, upper, norm):
    return torch.empty_like(x)


BOUNDARY_PROJECTION = _backend.OpBodies("boundary_projection", native_ops=("boundary_projection",))


# ---------------------------------------------------------------------------------------------
# The torch body: the definition of the op.


def boundary_projection_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lower: float, upper: float, norm: str
) -> torch.Tensor:
    """The projection of the module docstring by sorting the breakpoints (torch body), over
    (..., D) rows: x, w (..., D), b (...); δ (..., D) in x's dtype."""
    xd, wd = x.double(), w.double()
    r = (wd * xd).sum(dim=-1) + b.double()
    sign = torch.where(r > 0, -1.0, 1.0).to(torch.float64)  # direction in which w·δ must grow
    ws = wd * sign[..., None]
    reach = torch.where(ws > 0, upper - xd, xd - lower).clamp_min(0.0)
    active = ws != 0
    absw = ws.abs()
    if norm == "l2":
        v = ws * ws
        tau_i = torch.where(active, reach / torch.where(active, absw, 1.0), torch.inf)
    else:
        v = absw
        tau_i = torch.where(active, reach, torch.inf)
    order_tau, order = tau_i.sort(dim=-1)
    order_v = v.gather(-1, order)
    capped = torch.where(torch.isfinite(order_tau), order_v * order_tau, 0.0)
    below = capped.cumsum(dim=-1)  # Σ v_j τ_j over breakpoints <= τ_(k)
    suffix = order_v.flip(-1).cumsum(dim=-1).flip(-1)  # Σ v_j over breakpoints >= τ_(k)
    total = suffix[..., :1]
    above = torch.cat([suffix[..., 1:], torch.zeros_like(total)], dim=-1)  # ... > τ_(k), exactly 0 at the end
    g = below + torch.where(above > 0, order_tau, 0.0).nan_to_num(posinf=0.0) * above
    target = r.abs()[..., None]
    k = (g < target).sum(dim=-1, keepdim=True)  # first breakpoint where g reaches |r|
    dims = x.shape[-1]
    prev = (k - 1).clamp_min(0)
    below_prev = torch.where(k > 0, below.gather(-1, prev), 0.0)
    above_prev = torch.where(k > 0, above.gather(-1, prev), total)
    feasible = (k < dims) & (above_prev > 0)
    tau = torch.where(feasible, (target - below_prev) / torch.where(feasible, above_prev, 1.0), torch.inf)
    tau = torch.where(torch.isnan(target), torch.nan, tau)
    step = torch.where(active, torch.minimum(tau, tau_i), 0.0)
    delta = ws * step if norm == "l2" else torch.sign(ws) * step
    return delta.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The public wrapper.


def _check(x, w, b, lower, upper, norm) -> tuple[float, float, str]:
    _checks.tensor("x", x, dtypes=DTYPES)
    _checks.like("w", _checks.tensor("w", w, dtypes=DTYPES), "x", x)
    _checks.tensor("b", b, dtypes=DTYPES, min_dim=0)
    if b.shape != x.shape[:-1]:
        raise ValueError(
            f"b must have the shape of x without its last dim {tuple(x.shape[:-1])} (one offset per row), "
            f"got {tuple(b.shape)}"
        )
    if b.device != x.device:
        raise ValueError(f"b must be on the device of x ({x.device}), got {b.device}")
    if b.dtype != x.dtype:
        raise TypeError(f"b must have the dtype of x ({x.dtype}), got {b.dtype}")
    lower, upper = _checks.real("lower", lower), _checks.real("upper", upper)
    if not lower <= upper:
        raise ValueError(f"lower must be <= upper, got lower={lower}, upper={upper}")
    return lower, upper, _checks.choice("norm", norm, NORMS)


def boundary_projection(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    lower: float,
    upper: float,
    norm: str,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Smallest ``δ`` with ``w·(x + δ) + b = 0`` and ``lower <= x + δ <= upper`` per row (see the
    module docstring for the closed form), a new tensor.

    Args:
        x: (..., D) points in the box, float32 or float64, batched over any leading dims.
        w: (..., D) hyperplane normals (x's shape, dtype and device); b: (...) offsets (x's dtype).
        lower, upper: the box (``lower <= upper``).
        norm: ``"l2"`` or ``"linf"``, the norm of ``δ`` that is minimised.
        backend: force a body ("cuda", "triton", "cpp", "torch").

    Returns:
        δ (..., D) in x's dtype. Where the hyperplane misses the box, the ``δ`` that moves every
        coordinate to its bound along ``−sign(w·x + b)·w``; where ``w = 0``, ``δ = 0``.
    """
    lower, upper, norm = _check(x, w, b, lower, upper, norm)
    dims = x.shape[-1]
    if x.numel() == 0:
        return torch.zeros_like(x)
    rows = (x.reshape(-1, dims).contiguous(), w.reshape(-1, dims).contiguous(), b.reshape(-1).contiguous())
    name = _backend.resolve(BOUNDARY_PROJECTION, x.device, backend)
    if name == "torch":
        delta = boundary_projection_reference(*rows, lower, upper, norm)
    elif name == "triton":
        delta = torch.ops.pyadvk.boundary_projection_triton(*rows, lower, upper, norm)
    else:
        delta = torch.ops.pyadvk.boundary_projection(*rows, lower, upper, norm)
    return delta.view(x.shape)
