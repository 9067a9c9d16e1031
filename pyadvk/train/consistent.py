"""Adversarial training with a consistent loss (Dong et al. 2017): besides classifying real and
adversarial images, make the chosen layers represent an adversarial image like its real one,

    L = CE(f(x), y) + CE(f(x_adv), y) + λ · Σ_layers mean_b ‖φ(x_b) − φ(x_adv,b)‖² / dim(φ),

with φ a layer's output flattened per sample, dim(φ) its number of values per sample, and the
cross-entropies averaged over the batch. One forward of the concatenated batch ``[x; x_adv]``
computes everything (forward hooks read the layers), so in train mode batch-norm layers normalize
real and adversarial images with the same batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import capture, layer_list, resolve_layer, single_output
from pyadvk.attacks import PGD
from pyadvk.distributed import unwrap


def consistent_loss(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    layers: str | Sequence[str],
    lam: float = 1.0,
) -> torch.Tensor:
    """The consistent loss of real images ``x``, their adversarial images ``x_adv`` and labels ``y``.

    Args:
        model: the classifier (possibly wrapped in DistributedDataParallel: the layers are looked up
            on the wrapped module, the forward runs through the wrapper).
        x, x_adv: (B, ...) images of the same shape.
        y: (B,) int64 labels.
        layers: a layer name or a list of names from ``model.named_modules()``; each must run once
            per forward.
        lam: λ >= 0, the weight of the representation term.

    Returns:
        The scalar loss (float32), differentiable with respect to the model's parameters (and x_adv).
    """
    module = unwrap(model)
    layers = layer_list(layers)
    for name in layers:
        resolve_layer(module, name, argument="layers")
    lam = _checks.real("lam", lam, low=0.0)
    _checks.tensor("x", x)
    _checks.like("x_adv", x_adv, "x", x)
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != x.shape[:1]:
        what = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},) (one label per image), got {what}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one image, got an empty batch")
    batch = x.shape[0]
    with capture(module, layers) as outputs:
        logits = model(torch.cat([x, x_adv]))
        features = {name: single_output(outputs, name) for name in layers}
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2 * batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape ({2 * batch}, C), got {shape}")
    logits = logits.float()
    loss = nn.functional.cross_entropy(logits[:batch], y) + nn.functional.cross_entropy(logits[batch:], y)
    if lam > 0:
        for name, phi in features.items():
            if phi.shape[0] != 2 * batch:
                raise ValueError(
                    f"layer {name!r} must output one row per image ({2 * batch}), got shape {tuple(phi.shape)}"
                )
            phi = phi.float().reshape(2 * batch, -1)
            squared = (phi[:batch] - phi[batch:]).pow(2).sum(dim=1) / phi.shape[1]
            loss = loss + lam * squared.mean()
    return loss


class ConsistentAdversarialLoss:
    """``loss_fn(model, images, labels)``: PGD adversarial images (random start, input-only
    gradients, the model in whatever mode the caller set, as :func:`pgd_adversarial_loss`) and the
    :func:`consistent_loss` of the batch and them. Made by :func:`consistent_adversarial_loss`."""

    def __init__(
        self, *, eps: float, alpha: float, steps: int, layers, lam: float, norm: str, backend: str | None
    ) -> None:
        self.eps = _checks.real("eps", eps, low=0.0)
        self.alpha = _checks.real("alpha", alpha, low=0.0, low_inclusive=False)
        self.steps = _checks.integer("steps", steps, low=0)
        self.layers = layer_list(layers)
        self.lam = _checks.real("lam", lam, low=0.0)
        self.norm = _checks.choice("norm", norm, ("linf", "l2"))
        self.backend = backend

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        module = unwrap(model)
        for name in self.layers:
            resolve_layer(module, name, argument="layers")
        adv = PGD(module, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm, backend=self.backend)(
            images, labels
        )
        return consistent_loss(model, images.detach(), adv, labels, self.layers, self.lam)

    def __repr__(self) -> str:
        return (
            f"consistent_adversarial_loss(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, "
            f"layers={self.layers}, lam={self.lam}, norm={self.norm!r})"
        )


def consistent_adversarial_loss(
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
    *,
    layers: str | Sequence[str],
    lam: float = 1.0,
    norm: str = "linf",
    backend: str | None = None,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A training drop-in ``loss_fn(model, images, labels) -> loss`` (for
    :class:`pyadvk.train.AdversarialTrainer` or any loop): PGD-``steps`` images in the ``norm``
    ball of radius ``eps`` and :func:`consistent_loss` with weight ``lam`` on ``layers``.
    Arguments are checked here, before any training starts (layer names on the first call)."""
    return ConsistentAdversarialLoss(
        eps=eps, alpha=alpha, steps=steps, layers=layers, lam=lam, norm=norm, backend=backend
    )
