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


def _fraction(fraction: float) -> float:
    fraction = _checks.real("fraction", fraction, low=0.0)
    if fraction > 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return fraction


def half_half(
    images: torch.Tensor,
    labels: torch.Tensor,
    attack,
    *,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
    return_index: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The batch with a random ``fraction`` of its images (exactly ``round(fraction·B)``) replaced
    by ``attack(images, labels)`` run on those images only, as a sub-batch (pyadvk's half-half
    training; the reference code's selection is :func:`reference_adversarial_images` with
    ``affected``). With ``return_index``, also the (k,) indices of the attacked images."""
    fraction = _fraction(fraction)
    k = int(round(fraction * images.shape[0]))
    mixed = images.detach().clone()
    idx = torch.randperm(images.shape[0], generator=generator, device="cpu")[:k].to(images.device)
    if k:
        mixed[idx] = attack(mixed[idx], labels[idx]).to(mixed.dtype)
    return (mixed, idx) if return_index else mixed


def _mean_square(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean(t²)`` over dims 1.. (reduced together, as the reference code): shape (B,)."""
    return t.pow(2).mean(dim=tuple(range(1, t.dim())))


def reference_adversarial_images(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 0.01,
    steps: int = 7,
    l2min: bool = False,
    affected: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adversarial training examples of Woods et al.'s reference code, in RMS units
    (``rms(t) = ‖t‖₂ / √D``), from a zero start, with no box clipping and no momentum.

    For ``k = 0 .. N−1``, with ``x = x0 + δ`` and ``s_k = eps·(N − k)/(N(N + 1)/2)`` (summing to
    ``eps``): ``d = ∇ₓ Σ CE(f(x), y)`` while the sample is "not done", else ``d = −δ``;
    ``δ ← δ + s_k · a · d / (1e-8 + rms(d))``, with ``a ∈ {0, 1}`` per sample (``affected``).

    * ``l2min=False`` (the paper's adversarial training, ``eps = 0.01``): "not done" is
      ``rms(δ) < eps``; returns ``x0 + δ_N``.
    * ``l2min=True`` (L2,min, ``eps = 0.1``): "not done" is ``argmax f(x) = y``; one more
      evaluation at ``δ_N``; returns the smallest-``mean(δ²)`` misclassified ``x0 + δ_k``,
      ``k = 0..N`` (``x0`` where none was).

    ``affected`` (B,) bool: the samples attacked; the others keep ``δ = 0`` (the reference's
    half-half selection is a Bernoulli(0.5) ``affected`` over one whole-batch attack; default
    all). Every sample takes part in each forward pass, so with batch norm in training mode the
    attacked samples see the whole batch's statistics, as in the reference. Input gradients only.
    """
    _checks.tensor("images", images)
    eps = _checks.real("eps", eps, low=0.0, low_inclusive=False)
    steps = _checks.integer("steps", steps, low=1)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be an int64 tensor of shape ({images.shape[0]},)")
    x0 = images.detach()
    view = (-1,) + (1,) * (x0.dim() - 1)
    if affected is None:
        scale = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    else:
        if not isinstance(affected, torch.Tensor) or affected.dtype != torch.bool or affected.shape != x0.shape[:1]:
            got = f"{affected.dtype} {tuple(affected.shape)}" if isinstance(affected, torch.Tensor) else type(affected)
            raise ValueError(f"affected must be a bool tensor of shape ({x0.shape[0]},), got {got}")
        scale = affected.to(device=x0.device, dtype=x0.dtype)
    scale = scale.view(view)
    delta = torch.zeros_like(x0)
    best = torch.zeros_like(x0)
    best_sq = torch.full((x0.shape[0],), float("inf"), device=x0.device)
    for k in range(steps + 1 if l2min else steps):
        x = (x0 + delta).requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            (grad,) = torch.autograd.grad(_cross_entropy_sum(logits, labels), x)
        with torch.no_grad():
            if l2min:
                done = logits.argmax(dim=1) != labels
                sq = _mean_square(delta)
                better = done & (sq < best_sq)
                best_sq = torch.where(better, sq, best_sq)
                best = torch.where(better.view(view), delta, best)
                if k == steps:
                    break
            else:
                done = _mean_square(delta) >= eps**2
            direction = torch.where(done.view(view), -delta, grad)
            direction = direction / (1e-8 + _mean_square(direction).sqrt()).view(view) * scale
            delta = delta.add(direction, alpha=eps * (steps - k) / (steps * (steps + 1) / 2))
    return (x0 + (best if l2min else delta)).detach()


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def reference_adversarial_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    l2min: bool = False,
    eps: float | None = None,
    steps: int = 7,
) -> torch.Tensor:
    """The paper's adversarial training as its reference code does it: cross-entropy on
    :func:`reference_adversarial_images` of the whole batch, L2 in RMS units with ``eps = 0.01``
    (``l2min=True``: L2,min with ``eps = 0.1``), 7 decaying steps, zero start, no clipping."""
    eps = (0.1 if l2min else 0.01) if eps is None else eps
    adv = reference_adversarial_images(unwrap(model), images, labels, eps=eps, steps=steps, l2min=l2min)
    return _cross_entropy(model(adv), labels)


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
