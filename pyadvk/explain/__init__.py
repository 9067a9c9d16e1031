"""Adversarial explanations (Woods et al. 2019): for a very robust network, the smallest change that
moves an image toward a class shows what the network uses to recognize that class.

:func:`adversarial_explanation` runs, for each image and each target class t, the targeted walk
of the paper's ``g_explain``: with δ the perturbation and ``rms(t) = ‖t‖₂/√D``,

* while ``rms(δ) < rho``, step along the gradient of ``log p(t | x + δ)`` normalized to unit RMS;
* otherwise step along ``−δ / rms(δ)``, back toward the image;

with step sizes ``s_k = rho·overshoot·(N − k)/(N(N + 1)/2)`` (linearly decaying, summing to
``rho·overshoot``), no momentum, and ``x + δ`` clipped to ``[lower, upper]``. All (image, target)
pairs run as one batch. :func:`saliency` gives plain gradient saliency for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import guarded, ordinary
from pyadvk.attacks.l2min import rms
from pyadvk.nn.normalize import NormalizeArg, with_normalization


@dataclass
class Explanation:
    """``images`` (B, C, H, W); ``probabilities`` (B, K): the model's softmax on the images;
    ``targets`` (B, T): the classes explained; ``adversarial`` (B, T, C, H, W): ``x + δ`` for each
    target; ``target_probabilities`` (B, T): ``p(t | x + δ)``."""

    images: torch.Tensor
    probabilities: torch.Tensor
    targets: torch.Tensor
    adversarial: torch.Tensor
    target_probabilities: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        return self.adversarial - self.images[:, None]

    def mean_target_probability(self, labels: torch.Tensor | None = None) -> float:
        """How far the targeted walks got: the mean of ``p(t | x + δ)`` over every (image, target)
        pair whose target is not the image's class (``labels``, default the model's prediction on
        the image). 1 means every walk reached its class with certainty within ``rho``; on a
        network whose walks are faithful explanations it is high, on a weak one near ``1/C``."""
        own = self.probabilities.argmax(dim=1) if labels is None else labels.to(self.targets.device, torch.long)
        if own.shape != self.targets.shape[:1]:
            raise ValueError(f"labels must have shape ({self.targets.shape[0]},), got {tuple(own.shape)}")
        walks = self.targets != own[:, None]
        if not bool(walks.any()):
            raise ValueError("no targeted walk: every target is the image's own class")
        return float(self.target_probabilities[walks].double().mean())


def _default_targets(probs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Every class, ordered: the true class (or the prediction), the runner-up, then the rest by
    decreasing probability."""
    order = probs.argsort(dim=1, descending=True)
    if labels is None:
        return order
    first = labels[:, None]
    rest = order[order != first].view(len(order), -1)
    return torch.cat([first, rest], dim=1)


def adversarial_explanation(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    *,
    labels: torch.Tensor | None = None,
    rho: float = 0.1,
    steps: int = 35,
    overshoot: float = 5.0,
    lower: float = 0.0,
    upper: float = 1.0,
    normalize: NormalizeArg = None,
) -> Explanation:
    """Explanations of ``x`` (B, C, H, W) for ``targets``: a (B, T) tensor of classes, a list of
    classes used for every image, or None for every class (true class first, then runner-up…).
    ``labels`` name the true classes (default: the model's predictions).

    ``normalize=(mean, std)``: the model expects ``(x − mean) / std``; ``x``, the walk (``rho``,
    the box) and the explanation stay in pixel space. The model's buffers and train/eval flags are
    left as found, and a call under ``torch.inference_mode()`` works."""
    model = with_normalization(model, normalize)
    with guarded([model]):
        return _explain(model, ordinary(x), targets, labels, rho, steps, overshoot, lower, upper)


def _explain(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None,
    labels: torch.Tensor | None,
    rho: float,
    steps: int,
    overshoot: float,
    lower: float,
    upper: float,
) -> Explanation:
    _checks.tensor("x", x)
    rho = _checks.real("rho", rho, low=0.0, low_inclusive=False)
    steps = _checks.integer("steps", steps, low=1)
    overshoot = _checks.real("overshoot", overshoot, low=0.0, low_inclusive=False)
    lower, upper = _checks.bounds(lower, upper)
    x = x.detach()
    batch = x.shape[0]
    with torch.no_grad():
        logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(f"model must return logits of shape ({batch}, C), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    if targets is None:
        targets = _default_targets(probs, labels)
    elif not isinstance(targets, torch.Tensor):
        targets = torch.tensor(list(targets), dtype=torch.long, device=x.device).expand(batch, -1)
    targets = targets.to(x.device, torch.long)
    if targets.dim() != 2 or targets.shape[0] != batch:
        raise ValueError(f"targets must have shape ({batch}, T), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must be classes in [0, {num_classes}), got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    t = targets.shape[1]
    x0 = x[:, None].expand(batch, t, *x.shape[1:]).reshape(batch * t, *x.shape[1:])
    flat_targets = targets.reshape(-1)
    delta = torch.zeros_like(x0)
    n = steps
    sizes = rho * overshoot * (n - torch.arange(n, dtype=torch.float64)) / (n * (n + 1) / 2)
    for k in range(n):
        xk = (x0 + delta).clamp(lower, upper).requires_grad_(True)
        with torch.enable_grad():
            logp = model(xk).float().log_softmax(dim=1).gather(1, flat_targets[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, xk)
        with torch.no_grad():
            delta = xk.detach() - x0
            size = rms(delta)
            view = (-1,) + (1,) * (x0.dim() - 1)
            toward = grad / rms(grad).clamp_min(1e-30).view(view)
            back = -delta / size.clamp_min(1e-30).view(view)
            direction = torch.where((size < rho).view(view), toward, back)
            delta = delta + float(sizes[k]) * direction
    with torch.no_grad():
        adv = (x0 + delta).clamp(lower, upper)
        p_target = model(adv).float().softmax(dim=1).gather(1, flat_targets[:, None])[:, 0]
    return Explanation(x, probs, targets, adv.view(batch, t, *x.shape[1:]), p_target.view(batch, t))


def saliency(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, *, normalize: NormalizeArg = None
) -> torch.Tensor:
    """Gradient saliency ``|∂ log p(t | x) / ∂x|`` (same shape as ``x``); ``t`` defaults to the
    prediction. ``normalize=(mean, std)``: the model expects ``(x − mean) / std`` and the gradient
    is taken with respect to the pixels ``x``. The model's state is left as found."""
    _checks.tensor("x", x)
    model = with_normalization(model, normalize)
    with guarded([model]):
        x = ordinary(x).detach().requires_grad_(True)
        with torch.enable_grad():
            logp = model(x).float().log_softmax(dim=1)
            t = logp.argmax(dim=1) if target is None else target.to(x.device, torch.long)
            (grad,) = torch.autograd.grad(logp.gather(1, t[:, None]).sum(), x)
    return grad.abs()


def save_explanation_grid(
    path: str,
    explanation: Explanation,
    class_names: Sequence[str] | None = None,
    *,
    max_targets: int | None = None,
    title: str | None = None,
) -> None:
    """A PNG: per image, one row with the image and ``x + δ`` for each target (titled with the
    class and the reached probability ``p(t | x + δ)``), and one row with ``|δ|`` (summed over
    channels) as a heat map under each; every heat map shares one colour scale, shown by one colour
    bar, so the sizes of the perturbations compare across panels and images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from pyadvk._io import save_figure

    e = explanation
    t = e.targets.shape[1] if max_targets is None else min(max_targets, e.targets.shape[1])
    names = list(class_names) if class_names is not None else [str(i) for i in range(e.probabilities.shape[1])]
    rows, cols = 2 * e.images.shape[0], t + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.6 * cols + 1.0, 1.75 * rows + 0.4), squeeze=False, layout="constrained"
    )

    def show(ax, img):
        img = img.detach().float().cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())

    heat_norm = Normalize(0.0, float(e.delta[:, :t].abs().sum(dim=2).amax()) or 1.0)
    for i in range(e.images.shape[0]):
        pred = int(e.probabilities[i].argmax())
        show(axes[2 * i, 0], e.images[i])
        axes[2 * i, 0].set_title(f"{names[pred]} p={e.probabilities[i, pred]:.2f}", fontsize=8)
        axes[2 * i + 1, 0].text(0.5, 0.5, "|δ|", ha="center", va="center", fontsize=10)
        for j in range(t):
            cls = int(e.targets[i, j])
            show(axes[2 * i, j + 1], e.adversarial[i, j])
            axes[2 * i, j + 1].set_title(f"→{names[cls]} p={e.target_probabilities[i, j]:.2f}", fontsize=8)
            heat = e.delta[i, j].abs().sum(dim=0).cpu().numpy()
            axes[2 * i + 1, j + 1].imshow(heat, cmap="inferno", norm=heat_norm)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    bar = fig.colorbar(
        ScalarMappable(norm=heat_norm, cmap="inferno"), ax=axes[1::2, 1:].ravel().tolist() or axes, shrink=0.9
    )
    bar.set_label("|δ| (sum over channels)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)


__all__ = ["Explanation", "adversarial_explanation", "save_explanation_grid", "saliency"]
