"""Adversarial-training losses: each takes ``(model, images, labels)`` and returns a scalar loss
for the caller's ``backward()``, so it drops into any training loop.

The attacks inside take gradients with respect to the input only (no parameter ``.grad`` is
touched; under DistributedDataParallel they run on the wrapped module, so they start no gradient
all-reduce: only the final forward/backward of the loss synchronizes) and run the model in
whatever mode the caller set (``model.train()`` in a training loop,
as Madry et al. and Wong et al. do). They run under the caller's autocast context, and
channels_last inputs stay channels_last.
"""

from __future__ import annotations

import torch
from torch import nn

from pyadvk import _checks
from pyadvk.attacks import PGD, Attack
from pyadvk.distributed import unwrap
from pyadvk.ops import pgd as pgd_ops


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), labels)


def pgd_adversarial_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
    norm: str = "linf",
    backend: str | None = None,
) -> torch.Tensor:
    """PGD adversarial training (Madry et al. 2018): cross-entropy on PGD-``steps`` images
    (random start)."""
    adv = PGD(unwrap(model), eps=eps, alpha=alpha, steps=steps, norm=norm, backend=backend)(images, labels)
    return _cross_entropy(model(adv), labels)


def fast_fgsm_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fast adversarial training (Wong et al. 2020): a uniform random start in the L∞ ball, one
    FGSM step of ``alpha = 1.25·eps`` (default), projected back onto the ball and the box."""
    eps = _checks.real("eps", eps, low=0.0, low_inclusive=False)
    alpha = 1.25 * eps if alpha is None else alpha
    adv = pgd_ops.random_init(images.detach(), eps=eps, generator=generator, backend=backend)
    grad = Attack(unwrap(model), eps=eps, norm="linf").input_grad(adv, labels)
    with torch.no_grad():
        pgd_ops.pgd_step_(adv, images.detach(), grad, eps=eps, alpha=alpha, backend=backend)
    return _cross_entropy(model(adv), labels)


def half_half(
    images: torch.Tensor,
    labels: torch.Tensor,
    attack,
    *,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The batch with a random ``fraction`` of its images replaced by ``attack(images, labels)``
    on those images only (the half-half training of Woods et al. 2019)."""
    fraction = _checks.real("fraction", fraction, low=0.0)
    if fraction > 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * images.shape[0]))
    mixed = images.detach().clone()
    if k:
        idx = torch.randperm(images.shape[0], generator=generator, device="cpu")[:k].to(images.device)
        mixed[idx] = attack(mixed[idx], labels[idx]).to(mixed.dtype)
    return mixed


def half_half_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    attack=None,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy on a batch whose random half is adversarial (default attack: PGD-7, L∞ 8/255)."""
    attack = attack or PGD(unwrap(model), eps=8 / 255, alpha=2 / 255, steps=7)
    return _cross_entropy(model(half_half(images, labels, attack, fraction=fraction, generator=generator)), labels)


def standard_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy: standard training, for comparison."""
    return _cross_entropy(model(images), labels)
