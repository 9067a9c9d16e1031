"""The fused APGD step (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Algorithm 1, lines 6-7).

Where each body lives (one hop from here):

    torch   apgd_step_reference below (the definition of the op)
    cpp     csrc/apgd.cpp (checks, workspace) -> csrc/cpu/apgd_kernels.inc (the loops, compiled per
            instruction set by csrc/cpu/kernels_{default,avx2,avx512}.cpp); csrc/apgd.h: ApgdStepArgs
    cuda    csrc/cuda/apgd.cu (helpers: csrc/cuda/common.cuh)
    triton  kernels/apgd.py (helpers: kernels/_common.py)
    tests   tests/test_apgd_ops.py, test_fuzz_bodies.py, test_nonfinite.py, test_apgd_gpu.py
    bench   benchmarks/bench_apgd_step.py

For x, x_prev, x_orig, grad of shape (B, ...), per sample b (all dims but 0), with eta and eps
floats or per-sample tensors of shape (B,), momentum a float in [0, 1], arithmetic in float32
whatever the input dtype, and ``P`` the projection onto the eps-ball around x_orig followed by the
clip to the box [lower, upper]:

* ``z = P(x + eta * step(grad))``
* ``y = P(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))``

``linf``: ``step(g) = sign(g)`` and ``P(v) = clamp(clamp(v, x_orig - eps, x_orig + eps), lower,
upper)`` elementwise. ``l2``: ``step(g) = g / ||g||_2`` (0 when ``||g|| = 0``) and
``P(v) = clamp(x_orig + d * min(1, eps / ||d||_2), lower, upper)`` with ``d = v - x_orig`` (the
order of the published algorithm's implementation: ball, then box). NaN gradient entries are set
to 0, as in :func:`pyadvk.ops.pgd_step`. ``momentum = 1`` gives the first APGD iteration
(``y = P(z) = z``); the published value for later iterations is 0.75.

The l2 norms are taken in float64 and ``g / ||g||`` and ``eps / ||d||`` are formed in float64 then
rounded to float32: float32 squares overflow above 1e19 and underflow below 1e-19, which would turn
a gradient of 1e30 (or 1e-30) into no step, and a tiny ``d`` into no projection. So the step is the
same for ``g`` and ``c * g`` (any c > 0), and the result lies in the ball up to the rounding of the
last float32 operations. A NaN in x, x_prev or x_orig propagates as torch.minimum/maximum/clamp
propagate it (for l2 it also makes that sample's norm NaN, hence no projection of that sample).
An infinite value in x or x_orig makes an l2 norm infinite (that projection scales by 0: the
sample's finite values return to x_orig, the infinite ones become NaN), as
:func:`pyadvk.ops.pgd_step` documents. eta and eps must be finite in float32 (inf, NaN and floats
beyond 3.4e38 are refused; per-sample tensors are checked unless ``check_values=False``).

``apgd_step_reference`` is the torch body: it defines the op, and every other body (cpp, cuda,
triton) is tested against it. The step needs four passes over the data for l2 (the norm of g, the
norm of z's offset, the norm of the momentum point's offset, the write; each norm is summed from
the float offset itself, whose rounding is part of the op) and one for linf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyadvk import _backend, _checks
from pyadvk._layout import dense_format
from pyadvk.ops._library import define
from pyadvk.ops.pgd import NORMS, _per_sample_view

_ARGS = (
    "Tensor x_orig, Tensor grad, float eta, Tensor? eta_per_sample, float eps, Tensor? eps_per_sample, "
    "float momentum, float lower, float upper"
)
define("apgd_step_linf(Tensor x, Tensor x_prev, " + _ARGS + ") -> Tensor")
define("apgd_step_l2(Tensor x, Tensor x_prev, " + _ARGS + ") -> Tensor")
define("apgd_step_linf_(Tensor x, Tensor(a!) x_prev, " + _ARGS + ") -> ()")
define("apgd_step_l2_(Tensor x, Tensor(a!) x_prev, " + _ARGS + ") -> ()")


@torch.library.register_fake("pyadvk::apgd_step_linf")
def _fake_linf(x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper):
    return torch.empty_like(x)


@torch.library.register_fake("pyadvk::apgd_step_l2")
def _fake_l2(x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper):
    return torch.empty_like(x)


@torch.library.register_fake("pyadvk::apgd_step_linf_")
def _fake_linf_(x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper):
    return None


@torch.library.register_fake("pyadvk::apgd_step_l2_")
def _fake_l2_(x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper):
    return None


APGD_STEP = _backend.OpBodies(
    "apgd_step", native_ops=("apgd_step_linf", "apgd_step_l2", "apgd_step_linf_", "apgd_step_l2_")
)


# ---------------------------------------------------------------------------------------------
# The torch body: the definition of the op.


def _norm64(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norms of a (B, ...) tensor, accumulated and returned in float64."""
    return t.reshape(t.shape[0], -1).double().norm(dim=1)


def _project(v, xo, e, norm: str, lower: float, upper: float) -> torch.Tensor:
    if norm == "linf":
        return torch.minimum(torch.maximum(v, xo - e), xo + e).clamp(lower, upper)
    d = v - xo
    dn = _norm64(d)
    e = torch.full_like(dn, e) if not isinstance(e, torch.Tensor) else e.reshape(-1).double()
    factor = torch.where(dn > e, e / dn, 1.0).float()
    return (xo + d * _per_sample_view(factor, v)).clamp(lower, upper)


def apgd_step_reference(
    norm: str, x, x_prev, x_orig, grad, eta, eta_t, eps, eps_t, momentum, lower, upper
) -> torch.Tensor:
    """The APGD step of the module docstring (torch body)."""
    xk, xp, xo = x.float(), x_prev.float(), x_orig.float()
    g = torch.where(torch.isnan(grad.float()), 0.0, grad.float())
    e = eps if eps_t is None else _per_sample_view(eps_t, xk)
    h = eta if eta_t is None else _per_sample_view(eta_t, xk)
    if norm == "linf":
        step = torch.sign(g)
    else:
        gn = _per_sample_view(_norm64(g), xk)
        step = (g.double() / torch.where(gn > 0, gn, 1.0)).float()  # 0 where ||g|| = 0 (then g = 0)
    z = _project(xk + h * step, xo, e, norm, lower, upper)
    w = xk + momentum * (z - xk) + (1.0 - momentum) * (xk - xp)
    return _project(w, xo, e, norm, lower, upper).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The public wrapper.


# The ops of each (norm, in place) step: (compiled op of the cpp and cuda bodies, Triton op).
_OPS = {
    ("linf", False): ("apgd_step_linf", "apgd_step_linf_triton"),
    ("linf", True): ("apgd_step_linf_", "apgd_step_linf_triton_"),
    ("l2", False): ("apgd_step_l2", "apgd_step_l2_triton"),
    ("l2", True): ("apgd_step_l2_", "apgd_step_l2_triton_"),
}


@dataclass(frozen=True)
class ApgdParams:
    """The checked parameters of an APGD step: eta and eps as floats, or per-sample float32 (B,)
    tensors in ``eta_t`` / ``eps_t`` (the float then 0 and unused), momentum in [0, 1], the box."""

    norm: str
    eta: float
    eta_t: torch.Tensor | None
    eps: float
    eps_t: torch.Tensor | None
    momentum: float
    lower: float
    upper: float

    def op_args(self) -> tuple:
        """The scalar arguments of the ops, in schema order (after x, x_prev, x_orig, grad)."""
        return (self.eta, self.eta_t, self.eps, self.eps_t, self.momentum, self.lower, self.upper)


def _run(params: ApgdParams, x, x_prev, x_orig, grad, *, inplace: bool, backend: str | None) -> torch.Tensor:
    """Runs a checked step on the chosen body (``inplace``: into x_prev, which it returns)."""
    fmt = dense_format(x)
    if fmt is None or dense_format(x_prev) != fmt:
        y = _run(params, x.contiguous(), x_prev.contiguous(), x_orig, grad, inplace=False, backend=backend)
        return x_prev.copy_(y) if inplace else y
    x_orig = x_orig.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)
    args = (x, x_prev, x_orig, grad, *params.op_args())
    name = _backend.resolve(APGD_STEP, x.device, backend)
    if name == "torch":
        y = apgd_step_reference(params.norm, *args)
        return x_prev.copy_(y) if inplace else y
    compiled, triton = _OPS[params.norm, inplace]
    y = getattr(torch.ops.pyadvk, triton if name == "triton" else compiled)(*args)
    return x_prev if inplace else y


def _check(x, x_prev, x_orig, grad, eta, eps, momentum, norm, lower, upper, check_values) -> ApgdParams:
    for name, t in (("x", x), ("x_prev", x_prev), ("x_orig", x_orig), ("grad", grad)):
        _checks.tensor(name, t)
    for name, t in (("x_prev", x_prev), ("x_orig", x_orig), ("grad", grad)):
        _checks.like(name, t, "x", x)
    norm = _checks.choice("norm", norm, NORMS)
    lower, upper = _checks.bounds(lower, upper)
    momentum = _checks.real("momentum", momentum, low=0.0)
    if momentum > 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    batch, device = x.shape[0], x.device
    eta, eta_t = _checks.per_sample("eta", eta, batch, device, check_values=check_values)
    eps, eps_t = _checks.per_sample("eps", eps, batch, device, check_values=check_values)
    return ApgdParams(norm, eta, eta_t, eps, eps_t, momentum, lower, upper)


def apgd_step(
    x: torch.Tensor,
    x_prev: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    eta: float | torch.Tensor,
    eps: float | torch.Tensor,
    momentum: float = 0.75,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """One APGD step (see the module docstring for the formulas); a new tensor.

    Args:
        x, x_prev, x_orig, grad: (B, ...) tensors of one shape, dtype (float32/float16/bfloat16)
            and device: the current point, the previous point, the clean images and the gradient
            of the objective at ``x`` (to ascend).
        eta: step size (>= 0, finite in float32), a float or a (B,) tensor (APGD halves it per
            image).
        eps: radius of the ball around x_orig (>= 0, finite in float32), a float or a (B,) tensor.
        momentum: weight of the new step against the previous one, in [0, 1] (0.75 in APGD;
            1 for the first iteration).
        norm: "linf" or "l2".
        lower, upper: the box every value is clipped to.
        backend: force a body ("cuda", "triton", "cpp", "torch").
        check_values: check per-sample tensors for negative, NaN and infinite values (one device
            sync on CUDA); pass False inside a loop whose values were checked once.
    """
    params = _check(x, x_prev, x_orig, grad, eta, eps, momentum, norm, lower, upper, check_values)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _run(params, x, x_prev, x_orig, grad, inplace=False, backend=backend)


def apgd_step_(
    x: torch.Tensor,
    x_prev: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    eta: float | torch.Tensor,
    eps: float | torch.Tensor,
    momentum: float = 0.75,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """In-place :func:`apgd_step`: writes the new point into ``x_prev`` (which the caller no longer
    needs: the loop then swaps the two buffers) and returns it. ``x``, ``x_orig`` and ``grad`` may
    be ``x_prev`` itself but must not partly overlap it in memory (the bodies would read values
    another part of the step already wrote)."""
    params = _check(x, x_prev, x_orig, grad, eta, eps, momentum, norm, lower, upper, check_values)
    for name, t in (("x", x), ("x_orig", x_orig), ("grad", grad)):
        _checks.no_partial_overlap("x_prev", x_prev, name, t)
    if x.numel() == 0:
        return x_prev
    return _run(params, x, x_prev, x_orig, grad, inplace=True, backend=backend)
