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
shrinking steps and so converges on it. This follows the description of the paper's reference code
in ../shared/RESEARCH.md; where that leaves a detail open (how momentum combines with the RMS
normalization), the choice above is ours and documented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyadvk import _checks

CRITERIA = ("misclassify", "btr")


def rms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over all dims but the first: shape (B,)."""
    return t.reshape(t.shape[0], -1).pow(2).mean(dim=1).sqrt()


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
    never broken); ``broken``: whether a successful image was found."""

    images: torch.Tensor
    distances: torch.Tensor
    broken: torch.Tensor

    @property
    def unbroken(self) -> int:
        return int((~self.broken).sum())


class L2Min:
    """``L2Min(model, steps=450, budget=20.0, momentum=0.9, criterion="misclassify")``, called as
    ``attack(images, labels) -> L2MinResult``. Gradients are taken with respect to the input only;
    the model's mode is left as the caller set it."""

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
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.steps = _checks.integer("steps", steps, low=1)
        self.budget = _checks.real("budget", budget, low=0.0, low_inclusive=False)
        self.momentum = _checks.real("momentum", momentum, low=0.0)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum must be < 1, got {momentum}")
        self.criterion = _checks.choice("criterion", criterion, CRITERIA)
        self.lower, self.upper = _checks.bounds(lower, upper)

    def step_sizes(self, device=None) -> torch.Tensor:
        n = self.steps
        k = torch.arange(n, device=device, dtype=torch.float64)
        return (self.budget * (n - k) / (n * (n + 1) / 2)).float()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> L2MinResult:
        _checks.tensor("images", images)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be an int64 tensor of shape ({images.shape[0]},)")
        x0 = images.detach()
        batch = x0.shape[0]
        best = x0.clone()
        best_rms = torch.full((batch,), float("inf"), device=x0.device)
        if batch == 0:
            return L2MinResult(best, best_rms, torch.zeros(0, dtype=torch.bool, device=x0.device))
        delta = torch.zeros_like(x0)
        velocity = torch.zeros_like(x0)
        sizes = self.step_sizes(x0.device)
        for k in range(self.steps + 1):
            x = (x0 + delta).clamp_(self.lower, self.upper)
            delta = x - x0
            x.requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x)
                if k == 0 and (logits.dim() != 2 or logits.shape[0] != batch):
                    raise ValueError(f"model must return logits of shape ({batch}, C), got {tuple(logits.shape)}")
                loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                success = broken(logits.detach(), labels, self.criterion)
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
        return L2MinResult(best, best_rms, torch.isfinite(best_rms))
