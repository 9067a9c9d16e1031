"""Robust accuracy under a given attack, and robust accuracy as a function of the budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pyadvk import _checks, distributed
from pyadvk._modules import guarded, model_device, ordinary
from pyadvk.attacks import PGD
from pyadvk.metrics.ara import check_attack_normalization
from pyadvk.nn.normalize import NormalizeArg, with_normalization


def _batches(loader: DataLoader, n: int | None, device: torch.device):
    seen = 0
    for images, labels in loader:
        if n is not None:
            images, labels = images[: n - seen], labels[: n - seen]
        yield images.to(device), labels.to(device)
        seen += len(images)
        if n is not None and seen >= n:
            return


@dataclass
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def robust_accuracy(
    model: nn.Module,
    loader: DataLoader,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    *,
    n: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    normalize: NormalizeArg = None,
) -> float:
    """Fraction of the first ``n`` images (all by default) that ``model`` classifies correctly after
    ``attack(images, labels)``; ``attack=None`` gives the clean accuracy. In a process group the
    counts of every rank's loader are summed (see :func:`pyadvk.metrics.ara`).

    ``normalize=(mean, std)``: the model expects ``(x − mean) / std`` of the loader's pixel-space
    images; build the attack with the same ``normalize=`` (an attack on the bare model without it
    is refused). The model's buffers and train/eval flags are left as found."""
    model = with_normalization(model, normalize)
    if normalize is not None:
        check_attack_normalization(attack, model)
    return _count(model, loader, attack, n, device, progress, "robust accuracy").value


def _count(model, loader, attack, n, device, progress, desc) -> Accuracy:
    """Correct predictions after ``attack``, summed over the loader and over the ranks."""
    if n is not None and distributed.is_distributed():
        raise ValueError(
            "in a process group pass n=None and limit the images with "
            "pyadvk.distributed.shard_loader(dataset, batch_size, n=...)"
        )
    distributed.check_loader(loader)
    device = torch.device(device) if device is not None else model_device(model)
    correct = total = 0
    bar = tqdm(_batches(loader, n, device), desc=desc, leave=False, disable=not progress or not distributed.is_main())
    with guarded([model]):
        for images, labels in bar:
            images, labels = ordinary(images), ordinary(labels)
            x = images if attack is None else attack(images, labels)
            with torch.no_grad():
                correct += int((model(x).argmax(dim=1) == labels).sum())
            total += len(labels)
    correct, total = (int(v) for v in distributed.all_reduce_sum([correct, total]))
    if total == 0:
        raise ValueError("loader yielded no images")
    return Accuracy(correct, total)


@dataclass
class RobustnessCurve:
    """Robust accuracy of PGD for each budget in ``eps``."""

    eps: list[float]
    accuracy: list[float]
    norm: str
    label: str = ""

    def to_dict(self) -> dict:
        return {"eps": self.eps, "accuracy": self.accuracy, "norm": self.norm}

    def plot(self, path: str) -> None:
        plot_robustness([self], path)


def plot_robustness(curves: Sequence[RobustnessCurve], path: str) -> None:
    """One PNG with robust accuracy vs eps for every curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyadvk._io import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        ax.plot(c.eps, c.accuracy, marker="o", label=c.label or c.norm)
    ax.set_xlabel(f"eps ({curves[0].norm})" if curves else "eps")
    ax.set_ylabel("robust accuracy (PGD)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def robustness_curve(
    model: nn.Module,
    loader: DataLoader,
    eps_list: Sequence[float],
    *,
    norm: str = "linf",
    steps: int = 10,
    step_ratio: float = 2.5,
    n: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    label: str = "",
    backend: str | None = None,
    generator: torch.Generator | None = None,
    normalize: NormalizeArg = None,
) -> RobustnessCurve:
    """Robust accuracy under PGD-``steps`` (random start, step ``alpha = step_ratio·eps/steps``)
    for each ``eps`` in ``eps_list`` (eps = 0 gives the clean accuracy).

    ``generator``: draws every random start (a ``torch.Generator`` on the images' device), so two
    calls with generators seeded alike give the same curve; default torch's global generator.
    ``normalize=(mean, std)``: the model expects ``(x − mean) / std``; eps stays in pixel space."""
    if not len(eps_list):
        raise ValueError("eps_list must hold at least one budget")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    model = with_normalization(model, normalize)
    accuracy = []
    for eps in eps_list:
        _checks.real("eps", eps, low=0.0)
        attack = None
        if eps > 0:
            attack = PGD(
                model,
                eps=eps,
                alpha=step_ratio * eps / steps,
                steps=steps,
                norm=norm,
                backend=backend,
                generator=generator,
            )
        accuracy.append(_count(model, loader, attack, n, device, progress, f"PGD eps={eps:g}").value)
    return RobustnessCurve([float(e) for e in eps_list], accuracy, norm, label)
