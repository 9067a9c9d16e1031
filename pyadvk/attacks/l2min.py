"""The minimal-perturbation attack of Woods et al. 2019 ("L2,min"), which the ARA metric uses.

Per sample, with δ the perturbation (``x = clamp(x0 + δ, lower, upper)``) and N steps:

* while the sample is not yet broken, the direction is the gradient of the cross-entropy of the
  true class, normalized to unit RMS (``rms(t) = ‖t‖₂ / √D``); once it is broken, the direction is
  ``−δ / rms(δ)``, back toward the image;
* the velocity ``v ← momentum·v + direction`` sets the step, rescaled to length ``s_k`` in RMS:
  ``δ ← δ + s_k · v / rms(v)``, with ``s_k = budget·(N − k)/(N(N + 1)/2)`` (linearly decaying,
  summing to ``budget``);
* the smallest successful δ seen (by RMS) is kept.

"Broken" is ``argmax ≠ label`` (``criterion="misclassify"``) or ``softmax[label] ≤ 1/C``
(``criterion="btr"``, better than random). The walk oscillates across the decision boundary with
shrinking steps and so converges on it.

``procedure="reference"`` reproduces the paper's public reference code step for step instead:

* no box: ``x = x0 + δ`` is never clamped (``lower``/``upper`` are not used);
* the direction ``d`` (the raw gradient, or ``−δ`` once broken) is scaled to unit RMS as
  ``d / (1e-8 + rms(d))``, then averaged into the momentum ``m ← μ·m + (1 − μ)·d`` (no momentum
  for ``μ = 0``), and the step is ``δ ← δ + s_k·m``, *not* renormalised: its RMS length is below
  ``s_k`` wherever successive directions disagree;
* the best δ is the smallest successful one by ``mean(δ²)`` over the N + 1 evaluated points, and
  the distance is ``rms((x0 + δ) − x0)`` as the reference computes it;
* the reference refuses a result where some image first breaks after step ``N // 2`` (too small
  a budget to leave steps for minimising); here that is reported instead (``L2MinResult.late``,
  and a warning), and an image never broken gets distance ``inf`` (the reference would have
  stopped with an error).

``docs/ara.md`` lists both procedures' differences with their measured effect.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import guarded_call
from pyadvk.attacks import _common
from pyadvk.nn.normalize import NormalizeArg, with_normalization

CRITERIA = ("misclassify", "btr")
PROCEDURES = ("pyadvk", "reference")


def rms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over all dims but the first: shape (B,)."""
    return t.reshape(t.shape[0], -1).pow(2).mean(dim=1).sqrt()


def _mean_square(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean(t²)`` reduced over dims 1.. together, as the reference code does: shape (B,)."""
    return t.pow(2).mean(dim=tuple(range(1, t.dim())))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (like.dim() - 1))


def broken(logits: torch.Tensor, labels: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-sample success of an attack: misclassified, or true-class probability <= 1/C."""
    if criterion == "misclassify":
        return logits.argmax(dim=1) != labels
    probs = logits.float().softmax(dim=1)
    return probs.gather(1, labels[:, None])[:, 0] <= 1.0 / logits.shape[1]


@dataclass
class L2MinResult:
    """``images``: the smallest successful adversarial images (the original image where none was
    found); ``distances``: their RMS distance to the image (0 if it was already broken, ``inf`` if
    never broken); ``broken``: whether a successful image was found; ``first_broken``: the step
    (0..N) at which each image was first broken, -1 if never; ``steps``: N."""

    images: torch.Tensor
    distances: torch.Tensor
    broken: torch.Tensor
    first_broken: torch.Tensor | None = None
    steps: int = 0

    @property
    def unbroken(self) -> int:
        return int((~self.broken).sum())

    @property
    def late(self) -> torch.Tensor:
        """Per image: first broken after step ``N // 2``, or never (the reference code's check that
        every image breaks within the first half of the steps, which it enforces with an error)."""
        if self.first_broken is None:
            return ~self.broken
        return (self.first_broken < 0) | (self.first_broken > self.steps // 2)


class L2Min:
    """``L2Min(model, steps=450, budget=20.0, momentum=0.9, criterion="misclassify",
    procedure="pyadvk")``, called as ``attack(images, labels) -> L2MinResult``. Gradients are taken
    with respect to the input only; the model's mode is left as the caller set it.

    ``procedure="pyadvk"`` (default) is the box-respecting version described above;
    ``procedure="reference"`` the paper's reference code exactly (no clipping, momentum as an
    unnormalised average, the first-half check reported in ``L2MinResult.late`` and warned about).

    ``normalize=(mean, std)``: the model expects ``(x − mean) / std``; the walk, the box and the
    distances stay in pixel space (see :class:`pyadvk.nn.Normalize`). ``on_step``: called with
    the step index ``k`` (0..N) after each of the N + 1 model evaluations (a progress bar).
    The inputs get the check every attack shares (float images in ``[lower, upper]``, labels of
    any integer dtype in ``[0, C)``), the model's buffers and train/eval flags are left as
    found, and a call under ``torch.inference_mode()`` works (:mod:`pyadvk.attacks._common`).
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 450,
        budget: float = 20.0,
        momentum: float = 0.9,
        criterion: str = "misclassify",
        *,
        lower: float = 0.0,
        upper: float = 1.0,
        procedure: str = "pyadvk",
        normalize: NormalizeArg = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable as on_step(k), got {type(on_step).__name__}")
        self.model = with_normalization(model, normalize)
        self.on_step = on_step
        self.steps = _checks.integer("steps", steps, low=1)
        self.budget = _checks.real("budget", budget, low=0.0, low_inclusive=False)
        self.momentum = _checks.real("momentum", momentum, low=0.0)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum must be < 1, got {momentum}")
        self.criterion = _checks.choice("criterion", criterion, CRITERIA)
        self.lower, self.upper = _checks.bounds(lower, upper)
        self.procedure = _checks.choice("procedure", procedure, PROCEDURES)

    def step_sizes(self, device=None) -> torch.Tensor:
        n = self.steps
        k = torch.arange(n, device=device, dtype=torch.float64)
        return (self.budget * (n - k) / (n * (n + 1) / 2)).float()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> L2MinResult:
        """The smallest successful perturbation per image (see the module docstring).

        Args:
            images: (B, ...) float in ``[lower, upper]`` (for ``procedure="reference"`` too, whose
                walk then leaves the box); labels: (B,) class indices of any integer dtype.
        """
        return guarded_call([self.model], self._checked_call, images, labels)

    def _checked_call(self, images: torch.Tensor, labels: torch.Tensor) -> L2MinResult:
        _common.check_inputs(images, labels, self.lower, self.upper)
        labels = labels.long()
        x0 = images.detach()
        batch = x0.shape[0]
        if batch == 0:
            empty = torch.zeros(0, device=x0.device)
            return L2MinResult(
                x0.clone(), empty, empty.bool(), torch.zeros(0, dtype=torch.int64, device=x0.device), self.steps
            )
        if self.procedure == "reference":
            return self._reference(x0, labels)
        best = x0.clone()
        best_rms = torch.full((batch,), float("inf"), device=x0.device)
        first = torch.full((batch,), -1, dtype=torch.int64, device=x0.device)
        delta = torch.zeros_like(x0)
        velocity = torch.zeros_like(x0)
        sizes = self.step_sizes(x0.device)
        for k in range(self.steps + 1):
            x = (x0 + delta).clamp_(self.lower, self.upper)
            delta = x - x0
            logits, grad = self._logits_and_grad(x, labels, k)
            with torch.no_grad():
                success = broken(logits, labels, self.criterion)
                first = torch.where(success & (first < 0), k, first)
                size = rms(delta)
                better = success & (size < best_rms)
                best_rms = torch.where(better, size, best_rms)
                best = torch.where(_per_sample(better, x0), x.detach(), best)
                if k == self.steps:
                    break
                toward = grad / _per_sample(rms(grad).clamp_min(1e-30), grad)
                back = -delta / _per_sample(rms(delta).clamp_min(1e-30), delta)
                direction = torch.where(_per_sample(success, x0), back, toward)
                velocity.mul_(self.momentum).add_(direction)
                step = velocity / _per_sample(rms(velocity).clamp_min(1e-30), velocity)
                delta = delta + sizes[k] * step
        return L2MinResult(best, best_rms, torch.isfinite(best_rms), first, self.steps)

    def _logits_and_grad(self, x: torch.Tensor, labels: torch.Tensor, k: int):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            if k == 0:
                _common.check_logits(logits, labels)
            loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        if self.on_step is not None:
            self.on_step(k)
        return logits.detach(), grad

    def _reference(self, x0: torch.Tensor, labels: torch.Tensor) -> L2MinResult:
        """The reference code's walk (see the module docstring), N + 1 evaluations."""
        n, mu = self.steps, self.momentum
        batch = x0.shape[0]
        delta = torch.zeros_like(x0)
        mom = torch.zeros_like(x0)
        best = torch.zeros_like(x0)
        best_sq = torch.full((batch,), float("inf"), device=x0.device)
        first = torch.full((batch,), -1, dtype=torch.int64, device=x0.device)
        for k in range(n + 1):
            logits, grad = self._logits_and_grad(x0 + delta, labels, k)
            with torch.no_grad():
                success = broken(logits, labels, self.criterion)
                first = torch.where(success & (first < 0), k, first)
                sq = _mean_square(delta)
                better = success & (sq < best_sq)
                best_sq = torch.where(better, sq, best_sq)
                best = torch.where(_per_sample(better, x0), delta, best)
                if k == n:
                    break
                direction = torch.where(_per_sample(success, x0), -delta, grad)
                direction = direction / _per_sample(1e-8 + _mean_square(direction).sqrt(), direction)
                if mu > 0:
                    mom.mul_(mu).add_(direction, alpha=1.0 - mu)
                    direction = mom
                # python float, as the reference: S (N - k) / (N (N + 1) / 2)
                delta = delta.add(direction, alpha=self.budget * (n - k) / (n * (n + 1) / 2))
        images = x0 + best
        found = torch.isfinite(best_sq)
        distances = torch.where(found, _mean_square(images - x0).sqrt(), float("inf"))
        result = L2MinResult(images, distances, found, first, n)
        late = int(result.late.sum())
        if late:
            warnings.warn(
                f"L2Min(procedure='reference'): {late} of {batch} images broke after the first half of the "
                f"{n} steps or never (the reference code stops with an error here); increase budget or steps",
                stacklevel=3,
            )
        return result
