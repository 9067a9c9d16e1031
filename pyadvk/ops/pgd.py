"""Fused PGD steps and random starts.

Where each body lives (one hop from here):

    torch   the ``*_reference`` functions below (the definition of the ops)
    cpp     csrc/pgd.cpp (checks, workspace) -> csrc/cpu/pgd_kernels.inc (the loops, compiled per
            instruction set by csrc/cpu/kernels_{default,avx2,avx512}.cpp); csrc/pgd.h: PgdStepArgs
    cuda    csrc/cuda/pgd.cu (helpers: csrc/cuda/common.cuh)
    triton  kernels/pgd.py (helpers: kernels/_common.py)
    tests   tests/test_pgd_ops.py, test_pgd_errors.py, test_fuzz_bodies.py, test_nonfinite.py,
            test_pgd_gpu.py
    bench   benchmarks/bench_pgd_step.py, benchmarks/bench_random_init.py

For x_adv, x_orig, grad of shape (B, ...), per sample b (all dims but 0), with eps and alpha
floats or per-sample tensors of shape (B,), arithmetic in float32 whatever the input dtype:

* ``linf``: ``y = clamp(clamp(x_adv + alpha*sign(grad), x_orig - eps, x_orig + eps), lower, upper)``
* ``l2``:   ``u = g / ||g||_2`` (``u = 0`` when ``||g|| = 0``), ``d = x_adv + alpha*u - x_orig``,
  ``d = d * min(1, eps / ||d||_2)``, ``y = clamp(x_orig + d, lower, upper)``; the norms are taken
  in float64, so that gradients from 1e-30 to 1e30 (whose float32 squares underflow or overflow)
  give the same step as a unit gradient and the result always lies in the ball

where ``g`` is ``grad`` with NaN entries set to 0: a NaN gradient entry makes no step (linf), and
is left out of the norm and the step (l2). A zero gradient makes no step. An empty batch gives an
empty result. The functions ``*_reference`` below are the torch bodies: they define the ops, and
every other body (cpp, cuda, triton) is tested against them.

The order is *step, project onto the eps-ball, clip to the box* (torchattacks' order). For l2 the
step direction is ``g / ||g||`` exactly (torchattacks adds 1e-10 to the norm).

Non-finite values (every body gives what the torch body gives; tests/test_fuzz_bodies.py):

* eps and alpha must be finite in float32 (the public functions refuse inf, NaN and floats beyond
  3.4e38 such as 1e39, with per-sample tensors checked unless ``check_values=False``); the box
  may be unbounded (``lower=-inf``, ``upper=inf``).
* Images are not checked (that would cost a device sync per step): a NaN in x_adv or x_orig
  propagates to the result at that value, as torch.minimum/maximum/clamp propagate it; for l2 it
  also makes that sample's ``||d||`` NaN, so the sample is not projected. An infinite value in
  x_adv or x_orig makes ``||d|| = inf``: linf clips as the formula says; l2 scales d by 0, so the
  sample's finite values return to x_orig and the infinite ones become NaN (``inf * 0``), unless
  the sample also holds a NaN (then it is not projected).
* An infinite gradient entry is a step of alpha (linf); for l2 it makes ``||g|| = inf``, so the
  step ``g / ||g||`` is NaN at that value (``inf / inf``) and 0 elsewhere, and the sample is not
  projected.
* random_init: a NaN in x stays NaN; ``x + noise`` is clipped to the box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyadvk import _backend, _checks
from pyadvk._layout import dense_format
from pyadvk.ops._library import define

NORMS = ("linf", "l2")

_STEP_ARGS = (
    "Tensor x_orig, Tensor grad, float eps, float alpha, Tensor? eps_per_sample, "
    "Tensor? alpha_per_sample, float lower, float upper"
)
define("pgd_step_linf(Tensor x_adv, " + _STEP_ARGS + ") -> Tensor")
define("pgd_step_linf_(Tensor(a!) x_adv, " + _STEP_ARGS + ") -> ()")
define("pgd_step_l2(Tensor x_adv, " + _STEP_ARGS + ") -> Tensor")
define("pgd_step_l2_(Tensor(a!) x_adv, " + _STEP_ARGS + ") -> ()")
define(
    "random_init_linf(Tensor x, Tensor noise, float eps, Tensor? eps_per_sample, float lower, float upper) -> Tensor"
)

# The ops of each (norm, in place) step: (compiled op of the cpp and cuda bodies, Triton op).
_STEP_OPS = {
    ("linf", False): ("pgd_step_linf", "pgd_step_linf_triton"),
    ("linf", True): ("pgd_step_linf_", "pgd_step_linf_triton_"),
    ("l2", False): ("pgd_step_l2", "pgd_step_l2_triton"),
    ("l2", True): ("pgd_step_l2_", "pgd_step_l2_triton_"),
}


def _fake_step(x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper):
    return torch.empty_like(x_adv)


def _fake_step_(x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper):
    return None


for _op, _ in _STEP_OPS.values():
    torch.library.register_fake("pyadvk::" + _op, _fake_step_ if _op.endswith("_") else _fake_step)


@torch.library.register_fake("pyadvk::random_init_linf")
def _fake_init(x, noise, eps, eps_per_sample, lower, upper):
    return torch.empty_like(x)


STEP = _backend.OpBodies("pgd_step", native_ops=tuple(op for op, _ in _STEP_OPS.values()))
RANDOM_INIT = _backend.OpBodies("random_init", native_ops=("random_init_linf", "pgd_step_l2"))


@dataclass(frozen=True)
class StepParams:
    """The checked parameters of a PGD step (from :func:`step_params`).

    ``eps`` and ``alpha`` are floats, or per-sample float32 tensors of shape (B,) in ``eps_t`` and
    ``alpha_t`` (the float is then 0 and unused); ``lower`` < ``upper`` bound the box."""

    norm: str
    eps: float
    alpha: float
    eps_t: torch.Tensor | None
    alpha_t: torch.Tensor | None
    lower: float
    upper: float

    def op_args(self) -> tuple:
        """The scalar arguments of the ops, in schema order (after x_adv, x_orig, grad)."""
        return (self.eps, self.alpha, self.eps_t, self.alpha_t, self.lower, self.upper)


# ---------------------------------------------------------------------------------------------
# The torch bodies: the definition of each op.


def _per_sample_view(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t.view((-1,) + (1,) * (ref.dim() - 1))


def pgd_step_linf_reference(
    x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper
) -> torch.Tensor:
    xa, xo, g = x_adv.float(), x_orig.float(), grad.float()
    e = eps if eps_per_sample is None else _per_sample_view(eps_per_sample, xa)
    a = alpha if alpha_per_sample is None else _per_sample_view(alpha_per_sample, xa)
    step = a * torch.sign(torch.nan_to_num(g, nan=0.0))
    y = torch.minimum(torch.maximum(xa + step, xo - e), xo + e)
    return y.clamp(lower, upper).to(x_adv.dtype)


def pgd_step_l2_reference(
    x_adv, x_orig, grad, eps, alpha, eps_per_sample, alpha_per_sample, lower, upper
) -> torch.Tensor:
    xa, xo, g = x_adv.float(), x_orig.float(), grad.float()
    batch = xa.shape[0]
    a = alpha if alpha_per_sample is None else _per_sample_view(alpha_per_sample, xa)
    g = torch.where(torch.isnan(g), 0.0, g)
    gn = _per_sample_view(g.double().reshape(batch, -1).norm(dim=1), xa)
    u = torch.where(gn > 0, g.double() / torch.where(gn > 0, gn, 1.0), 0.0).float()
    d = xa + a * u - xo
    dn = d.double().reshape(batch, -1).norm(dim=1)
    e = torch.full_like(dn, eps) if eps_per_sample is None else eps_per_sample.double()
    factor = torch.where(dn > e, e / dn, 1.0).float()
    return (xo + d * _per_sample_view(factor, xa)).clamp(lower, upper).to(x_adv.dtype)


def random_init_linf_reference(x, noise, eps, eps_per_sample, lower, upper) -> torch.Tensor:
    """``clamp(x + eps * (2*noise - 1), lower, upper)`` for noise uniform in [0, 1)."""
    e = eps if eps_per_sample is None else _per_sample_view(eps_per_sample, x)
    return (x.float() + e * (2 * noise - 1)).clamp(lower, upper).to(x.dtype)


_STEP_REFERENCE = {"linf": pgd_step_linf_reference, "l2": pgd_step_l2_reference}


# ---------------------------------------------------------------------------------------------
# Dispatch to a body.


def run_step(
    params: StepParams,
    x_adv: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    inplace: bool,
    backend: str | None,
) -> torch.Tensor:
    """Runs a checked step on the chosen body; x_orig and grad follow x_adv's memory format.
    ``inplace`` writes the step into x_adv and returns it."""
    fmt = dense_format(x_adv)
    if fmt is None:  # not dense: compute on a contiguous copy (and write back for in-place)
        y = run_step(params, x_adv.contiguous(), x_orig, grad, inplace=False, backend=backend)
        return x_adv.copy_(y) if inplace else y
    x_orig = x_orig.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)
    args = (x_adv, x_orig, grad, *params.op_args())
    name = _backend.resolve(STEP, x_adv.device, backend)
    if name == "torch":
        y = _STEP_REFERENCE[params.norm](*args)
        return x_adv.copy_(y) if inplace else y
    compiled, triton = _STEP_OPS[params.norm, inplace]
    y = getattr(torch.ops.pyadvk, triton if name == "triton" else compiled)(*args)
    return x_adv if inplace else y


def step_params(x, eps, alpha, norm, lower, upper, check_values=True) -> StepParams:
    """Checks the parameters of a step on batch ``x`` (errors name the argument and the value)."""
    norm = _checks.choice("norm", norm, NORMS)
    lower, upper = _checks.bounds(lower, upper)
    batch, device = x.shape[0], x.device
    eps, eps_t = _checks.per_sample("eps", eps, batch, device, check_values=check_values)
    alpha, alpha_t = _checks.per_sample("alpha", alpha, batch, device, positive=True, check_values=check_values)
    return StepParams(norm, eps, alpha, eps_t, alpha_t, lower, upper)


def _check_step(x_adv, x_orig, grad, eps, alpha, norm, lower, upper, check_values) -> StepParams:
    _checks.tensor("x_adv", x_adv)
    _checks.tensor("x_orig", x_orig)
    _checks.tensor("grad", grad)
    _checks.like("x_orig", x_orig, "x_adv", x_adv)
    _checks.like("grad", grad, "x_adv", x_adv)
    return step_params(x_adv, eps, alpha, norm, lower, upper, check_values)


def pgd_step(
    x_adv: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    alpha: float | torch.Tensor,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """One projected-gradient step (see the module docstring for the formulas); a new tensor.

    Args:
        x_adv, x_orig, grad: (B, ...) tensors of one shape, dtype (float32/float16/bfloat16) and
            device; contiguous or channels_last (other layouts are copied).
        eps: radius of the ball around x_orig (>= 0, finite in float32), a float or a (B,) tensor.
        alpha: step size (> 0, finite in float32), a float or a (B,) tensor.
        norm: "linf" or "l2".
        lower, upper: the box every value is clipped to (lower < upper).
        backend: force a body ("cuda", "triton", "cpp", "torch"); default: see pyadvk.set_backend.
        check_values: check per-sample eps/alpha tensors for negative, NaN and infinite values (one
            device sync on CUDA); pass False inside a loop whose values were checked once.
    """
    params = _check_step(x_adv, x_orig, grad, eps, alpha, norm, lower, upper, check_values)
    if x_adv.numel() == 0:
        return torch.empty_like(x_adv)
    return run_step(params, x_adv, x_orig, grad, inplace=False, backend=backend)


def pgd_step_(
    x_adv: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    alpha: float | torch.Tensor,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """In-place :func:`pgd_step`: writes the step into ``x_adv`` and returns it (no allocation
    on the cpp/cuda/triton bodies when the tensors share a dense layout). ``x_orig`` and ``grad``
    may be ``x_adv`` itself but must not partly overlap it in memory."""
    params = _check_step(x_adv, x_orig, grad, eps, alpha, norm, lower, upper, check_values)
    _checks.no_partial_overlap("x_adv", x_adv, "x_orig", x_orig)
    _checks.no_partial_overlap("x_adv", x_adv, "grad", grad)
    if x_adv.numel() == 0:
        return x_adv
    return run_step(params, x_adv, x_orig, grad, inplace=True, backend=backend)


def random_init(
    x: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """A random start: ``x`` plus a point drawn uniformly from the eps-ball, clipped to the box.

    * ``linf``: ``clamp(x + eps * (2u - 1), lower, upper)``, u uniform in [0, 1) per value.
    * ``l2``: ``clamp(x + r * z / ||z||_2, lower, upper)`` per sample, z standard normal (a
      uniform direction) and ``r = eps * U^(1/D)`` (U uniform in [0, 1), D values per sample):
      uniform in the ball. (torchattacks' PGDL2 start is not uniform in the ball.)

    The noise comes from torch's generator (``generator``), so every body gives the same start for
    the same generator state; the fused bodies then apply the formula in one pass (linf) or one
    reduction + one pass (l2).
    """
    _checks.tensor("x", x)
    norm = _checks.choice("norm", norm, NORMS)
    lower, upper = _checks.bounds(lower, upper)
    eps, eps_t = _checks.per_sample("eps", eps, x.shape[0], x.device, check_values=check_values)
    if x.numel() == 0:
        return torch.empty_like(x)
    x = x.contiguous(memory_format=dense_format(x) or torch.contiguous_format)
    if norm == "linf":
        noise = torch.empty_like(x, dtype=torch.float32).uniform_(generator=generator)
        name = _backend.resolve(RANDOM_INIT, x.device, backend)
        if name == "torch":
            return random_init_linf_reference(x, noise, eps, eps_t, lower, upper)
        op = torch.ops.pyadvk.random_init_linf_triton if name == "triton" else torch.ops.pyadvk.random_init_linf
        return op(x, noise, eps, eps_t, lower, upper)
    batch = x.shape[0]
    z = torch.empty_like(x, dtype=torch.float32).normal_(generator=generator).to(x.dtype)
    u = torch.rand(batch, generator=generator, device=x.device)
    radius = (eps if eps_t is None else eps_t) * u.pow(1.0 / (x.numel() // batch))
    # the l2 step from x along z with a per-sample step of radius and no ball: x + radius * z / |z|
    params = StepParams("l2", math.inf, 0.0, None, radius, lower, upper)
    return run_step(params, x, x, z, inplace=False, backend=backend)
