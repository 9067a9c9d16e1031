"""Shared pieces of the minimal-norm attacks (:class:`~pyadvk.attacks.fab.FAB`,
:class:`~pyadvk.attacks.deepfool.DeepFool`): their result, the projection onto a linearised decision
boundary intersected with the input box, the Jacobian of logit differences and the final line search.

**Box-constrained projection.** For a point ``x`` in the box ``[lower, upper]^D``, a hyperplane
``w·z + b = 0`` and ``p ∈ {2, ∞}``, :func:`project_boundary` returns the smallest ``δ`` (in the
``p`` norm) with ``w·(x + δ) + b = 0`` and ``lower <= x + δ <= upper``. Write ``r = w·x + b``,
``s = −sign(r)`` and ``w' = s·w``; the problem becomes ``w'·δ = |r|``. Let
``reach_i = (upper − x_i)`` where ``w'_i > 0`` and ``(x_i − lower)`` where ``w'_i < 0`` (how far
coordinate ``i`` may move in the useful direction). The minimiser is, for a scalar ``τ >= 0``:

* L2 (Lagrangian stationarity, then clipping): ``δ_i = s·sign(w_i)·|w_i|·min(τ, τ_i)`` with
  ``τ_i = reach_i / |w_i|``;
* L∞ (every free coordinate moves by the radius ``τ``): ``δ_i = s·sign(w_i)·min(τ, τ_i)`` with
  ``τ_i = reach_i``.

In both, ``w'·δ(τ) = g(τ) = Σ_i v_i·min(τ, τ_i)`` with ``v_i = w_i²`` (L2) or ``|w_i|`` (L∞): a
concave, piecewise-linear, non-decreasing function. The segment where ``g`` crosses ``|r|`` gives ``τ`` in
closed form (exact up to rounding): the op :mod:`pyadvk.ops.boundary_projection` finds it by
sorting the breakpoints ``τ_i`` (its torch reference) or by a bisection on ``τ`` without a sort
(its cpp, cuda and triton bodies), in float64 whatever the input dtype. If ``|r| > g(∞)`` the hyperplane does
not meet the box and ``δ(∞)`` (every coordinate at its reach) is returned: the box point
closest to the hyperplane along ``w``, as FAB's paper prescribes for that case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import guarded_call
from pyadvk.attacks.pgd import Attack
from pyadvk.nn.normalize import NormalizeArg
from pyadvk.ops.boundary_projection import boundary_projection

NORMS = ("linf", "l2")
Model = Callable[[torch.Tensor], torch.Tensor]  # images (B, ...) -> logits (B, C)


@dataclass
class MinimalResult:
    """The smallest adversarial perturbation an attack found per image.

    ``images`` (B, ...): the adversarial images (the clean image where none was found);
    ``distances`` (B,): ``‖images − x0‖`` in the attack's norm (``‖·‖₂`` for ``norm="l2"``,
    ``max |·|`` for ``norm="linf"``), ``0`` where the image was already misclassified, ``inf``
    where no adversarial image was found; ``broken`` (B,) bool: an adversarial image was found
    (``argmax model(images) ≠ label``); ``norm``: ``"l2"`` or ``"linf"``.
    """

    images: torch.Tensor
    distances: torch.Tensor
    broken: torch.Tensor
    norm: str

    @property
    def rms_distances(self) -> torch.Tensor:
        """L2 distances in RMS units, ``‖δ‖₂ / √D`` (D values per image): the unit of
        :class:`~pyadvk.attacks.L2Min` and the ARA. Defined for ``norm="l2"`` results only."""
        if self.norm != "l2":
            raise ValueError(
                f"rms_distances is defined for norm='l2' results (the L2 norm in RMS units), got norm={self.norm!r}; "
                "run the attack with norm='l2'"
            )
        dims = self.images[0].numel() if self.images.shape[0] else 1
        return self.distances / math.sqrt(dims)

    @property
    def unbroken(self) -> int:
        """How many images no adversarial example was found for."""
        return int((~self.broken).sum())


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a (B,) tensor to broadcast over the (B, ...) tensor ``like``."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def norm_of(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm over all dims but the first: ``‖t_b‖₂`` or ``max |t_b|``, shape (B,)."""
    flat = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def dual_norm_of(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm dual to ``norm`` over the last dim: ``‖t‖₂`` for L2, ``‖t‖₁`` for L∞."""
    return t.norm(dim=-1) if norm == "l2" else t.abs().sum(dim=-1)


def project_boundary(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    lower: float,
    upper: float,
    norm: str,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Smallest ``δ`` with ``w·(x + δ) + b = 0`` and ``lower <= x + δ <= upper`` (see the module
    docstring for the closed form): the fused op :func:`pyadvk.ops.boundary_projection`.

    Args:
        x: (..., D) points in the box, batched over any leading dims (images, classes).
        w: (..., D) hyperplane normals; ``b``: (...) offsets. The three are projected in their
            promoted dtype (float32 where that is float16 or bfloat16) and δ returned in x's.
        norm: ``"l2"`` or ``"linf"``, the norm of ``δ`` that is minimised.
        backend: force a body ("cuda", "triton", "cpp", "torch").

    Returns:
        δ of shape (..., D). Where the hyperplane misses the box, the ``δ`` that moves every
        coordinate to its bound along ``−sign(w·x + b)·w``; where ``w = 0``, ``δ = 0``.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, w.dtype), b.dtype)
    if dtype != torch.float64:
        dtype = torch.float32  # the op's dtypes; float16/bfloat16 inputs are projected in float32
    delta = boundary_projection(x.to(dtype), w.to(dtype), b.to(dtype), lower, upper, norm, backend=backend)
    return delta.to(x.dtype)


def logit_jacobian(
    model: Model, x: torch.Tensor, classes: torch.Tensor | None = None, relative_to: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) at ``x`` and the Jacobian of the logits ``classes`` (B, K) (default: all C)
    with respect to the input only, shape (B, K, D), from one forward pass and one batched backward
    (``is_grads_batched``: the K vector-Jacobian products run as one vmapped backward). Falls back
    to K backward passes where an op of the model has no batching rule.

    With ``relative_to`` (B,) (a class per image, e.g. the labels ``y``), the rows are the
    Jacobians of the logit differences ``z_k − z_y``, each from one vector-Jacobian product with
    the cotangent ``e_k − e_y`` (so the C − 1 differences FAB and DeepFool need cost C − 1
    products, not C)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        batch, num = logits.shape
        if classes is None:
            classes = torch.arange(num, device=x.device).expand(batch, num)
        picks = nn.functional.one_hot(classes.t(), num).to(logits.dtype)  # (K, B, C)
        if relative_to is not None:
            picks = picks - nn.functional.one_hot(relative_to, num).to(logits.dtype)
        try:
            (jac,) = torch.autograd.grad(logits, x, picks, is_grads_batched=True, retain_graph=True)
        except RuntimeError:
            rows = [torch.autograd.grad(logits, x, pick, retain_graph=True)[0] for pick in picks]
            jac = torch.stack(rows)
    return logits.detach(), jac.reshape(classes.shape[1], batch, -1).transpose(0, 1)


def other_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Every class but the label, per image: (B, C − 1), ``(y + 1 + i) mod C`` for i = 0 … C − 2."""
    offsets = torch.arange(1, num_classes, device=labels.device)
    return (labels[:, None] + offsets) % num_classes


def logit_difference_grad(
    model: Model, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, C), ``z_t − z_y`` (B,) and its input gradient (B, D) from one forward and one
    backward pass (``t = targets``, ``y = labels``)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        diff = logits.gather(1, targets[:, None])[:, 0] - logits.gather(1, labels[:, None])[:, 0]
        (grad,) = torch.autograd.grad(diff.sum(), x)
    return logits.detach(), diff.detach(), grad.reshape(x.shape[0], -1)


@torch.no_grad()
def misclassified(model: Model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``argmax model(x) ≠ labels``, shape (B,)."""
    return model(x).argmax(dim=1) != labels


@torch.no_grad()
def line_search(model: Model, x0: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """Bisection on the segment ``x0 + t·(adv − x0)``, ``t ∈ [0, 1]``, for images where ``adv``
    is adversarial: keeps the smallest ``t`` seen adversarial (``steps`` forward passes, the
    interval shrinks by 2^steps). Returns the image at that ``t``: never farther than ``adv``,
    always adversarial where ``adv`` was (in the box whenever ``x0`` and ``adv`` are)."""
    delta = adv - x0
    lo = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        fooled = misclassified(model, x0 + per_sample(mid, x0) * delta, labels)
        hi = torch.where(fooled, mid, hi)
        lo = torch.where(fooled, lo, mid)
    return x0 + per_sample(hi, x0) * delta


class MinimalAttack(Attack):
    """Common set-up of the minimal-norm attacks: the checks of :class:`Attack` (images in
    ``[lower, upper]``, int labels, (B, C) logits) and the bookkeeping of the best image."""

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str,
        eps: float | None,
        lower: float,
        upper: float,
        normalize: NormalizeArg = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        backend: str | None = None,
    ) -> None:
        if eps is not None:
            eps = _checks.real("eps", eps, low=0.0)
        super().__init__(
            model,
            eps=0.0 if eps is None else eps,
            norm=norm,
            lower=lower,
            upper=upper,
            normalize=normalize,
            autocast=autocast,
            channels_last=channels_last,
            backend=backend,
        )
        self.eps = eps  # type: ignore[assignment]  # None: no radius (only .minimal may be called)

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits at ``x`` in the attack's modes: ``x`` in channels_last memory format
        (``channels_last=True``), the model's arithmetic under ``torch.autocast`` (``autocast``,
        logits returned in float32). The Jacobians, projections and steps stay in the images' dtype."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.model(x).float()

    def minimal(self, images: torch.Tensor, labels: torch.Tensor) -> MinimalResult:
        """The smallest adversarial perturbation the attack finds per image, after the shared input
        checks, with the model's state preserved and out of inference mode (as a call)."""

        def checked(images: torch.Tensor, labels: torch.Tensor) -> MinimalResult:
            self.check_inputs(images, labels)
            return self._minimal(images.detach(), labels.long())

        return guarded_call(self.guarded_models(), checked, images, labels)

    def _minimal(self, images: torch.Tensor, labels: torch.Tensor) -> MinimalResult:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images where one within ``eps`` was found, the clean image elsewhere."""
        if self.eps is None:
            raise ValueError(
                f"{type(self).__name__}(...)(images, labels) needs eps (the radius an adversarial image must lie "
                "within), got eps=None; pass eps= or call .minimal(images, labels)"
            )
        result = self.minimal(images, labels)
        keep = result.broken & (result.distances <= self.eps)
        return torch.where(per_sample(keep, images), result.images, images.detach())

    def start(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``x0`` (detached), the int64 labels and the clean logits (checked against the labels)."""
        labels = labels.long()
        x0 = images.detach()
        with torch.no_grad():
            logits = self.run_model(x0)
        self.check_logits(logits, labels)
        if logits.shape[1] < 2:
            raise ValueError(f"model must return logits of at least 2 classes, got shape {tuple(logits.shape)}")
        return x0, labels, logits

    def result(self, x0: torch.Tensor, best: torch.Tensor, found: torch.Tensor) -> MinimalResult:
        """The result for best images ``best`` (adversarial where ``found``)."""
        distances = torch.where(found, norm_of(best - x0, self.norm), torch.inf)
        images = torch.where(per_sample(found, x0), best, x0)
        return MinimalResult(images, distances, found, self.norm)
