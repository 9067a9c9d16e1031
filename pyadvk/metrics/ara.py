"""The Accuracy-Robustness Area (Woods et al. 2019).

For n test images, ``r_i`` is the RMS size of the smallest successful perturbation the
minimal-perturbation attack (:class:`pyadvk.attacks.L2Min`) finds (``r_i = 0`` for an image already
misclassified). ``Acc(ε) = #{i : r_i > ε} / n`` is the accuracy under perturbations of RMS size
``ε``, and

    ARA = ∫₀^{max r} max(0, Acc(ε) − 1/C) dε,      C = number of classes.

``Acc`` is a step function, so the integral is computed exactly from the sorted distances (the
reference code's Riemann sum over a 1000-bin histogram converges to the same value). Images the
attack never breaks are counted as robust up to the largest distance found and reported in
``unbroken``; the reference settings break every image, and a non-zero ``unbroken`` says the
attack's budget was too small for the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pyadvk import _checks, distributed
from pyadvk.attacks.l2min import CRITERIA, L2Min


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def ara_from_distances(distances: torch.Tensor, num_classes: int) -> float:
    """The exact ARA of per-image distances (``inf`` for unbroken images)."""
    r = distances.double().cpu()
    n = r.numel()
    if n == 0:
        raise ValueError("ARA needs at least one image")
    finite = r[torch.isfinite(r)].sort().values
    if finite.numel() == 0:
        return 0.0
    # On [t_{j-1}, t_j) between consecutive sorted distances, Acc = #{r > t_{j-1}} / n.
    edges = torch.cat([torch.zeros(1, dtype=r.dtype), finite])
    above = n - torch.searchsorted(finite, edges[:-1], right=True)
    height = (above.double() / n - 1.0 / num_classes).clamp_min(0.0)
    return float((height * (edges[1:] - edges[:-1])).sum())


@dataclass
class AraResult:
    """ARA with everything it was computed from, and its accuracy curve."""

    ara: float
    criterion: str
    num_classes: int
    distances: torch.Tensor
    unbroken: int
    label: str = ""
    eps: torch.Tensor = field(init=False)
    accuracy: torch.Tensor = field(init=False)

    def __post_init__(self):
        finite = self.distances[torch.isfinite(self.distances)]
        top = float(finite.max()) if finite.numel() else 0.0
        self.eps = torch.linspace(0.0, top, 1000)
        self.accuracy = (self.distances[None, :] > self.eps[:, None]).double().mean(dim=1)

    @property
    def unperturbed_accuracy(self) -> float:
        """Acc(0): the clean accuracy for "misclassify"; for "btr", the fraction of images whose
        true-class probability exceeds 1/C."""
        return float((self.distances > 0).double().mean())

    def to_dict(self) -> dict:
        return {
            "ara": self.ara,
            "criterion": self.criterion,
            "num_classes": self.num_classes,
            "n": int(self.distances.numel()),
            "unbroken": self.unbroken,
            "unperturbed_accuracy": self.unperturbed_accuracy,
            "median_distance": float(self.distances.median()) if self.distances.numel() else 0.0,
        }

    def plot(self, path: str) -> None:
        """Writes the accuracy curve Acc(ε) as a PNG (see :func:`plot_ara`)."""
        plot_ara([self], path)


def plot_ara(results: list[AraResult], path: str, title: str = "Accuracy under minimal perturbations") -> None:
    """One PNG with the Acc(ε) curve of every result, the chance line 1/C, and ARA in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyadvk._io import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        name = r.label or r.criterion
        ax.plot(r.eps.numpy(), r.accuracy.numpy(), label=f"{name} ({r.criterion}-ARA {r.ara:.4f})")
    if results:
        ax.axhline(1.0 / results[0].num_classes, color="gray", ls="--", lw=1, label="chance 1/C")
    ax.set_xlabel("RMS perturbation size ε")
    ax.set_ylabel("Acc(ε)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def ara(
    model: nn.Module,
    loader: DataLoader,
    *,
    criterion: str = "misclassify",
    n: int | None = 1000,
    num_classes: int | None = None,
    steps: int = 450,
    budget: float = 20.0,
    momentum: float = 0.9,
    device: torch.device | str | None = None,
    progress: bool = True,
    label: str = "",
) -> AraResult:
    """ARA of ``model`` on the first ``n`` images of ``loader`` (all of them for ``n=None``; see
    the module docstring).

    ``num_classes`` defaults to the width of the model's logits. The model is used as it is (call
    ``model.eval()`` first for a model with batch norm or dropout). In a torch.distributed process
    group every rank attacks its own loader and the distances are gathered: build the loaders with
    :func:`pyadvk.distributed.shard_loader` (which takes ``n``) and pass ``n=None``; the result is
    the same as one process on the same images.
    """
    criterion = _checks.choice("criterion", criterion, CRITERIA)
    if n is not None:
        _checks.integer("n", n, low=1)
        if distributed.is_distributed():
            raise ValueError(
                "in a process group pass n=None and limit the images with "
                "pyadvk.distributed.shard_loader(dataset, batch_size, n=...)"
            )
    distributed.check_loader(loader)
    device = torch.device(device) if device is not None else _model_device(model)
    attack = L2Min(model, steps=steps, budget=budget, momentum=momentum, criterion=criterion)
    distances = []
    seen = 0
    total = n if n is not None else len(loader.sampler) if hasattr(loader, "sampler") else None
    bar = tqdm(
        total=total, desc=f"{criterion}-ARA", unit="img", leave=False, disable=not progress or not distributed.is_main()
    )
    for images, labels in loader:
        if n is not None:
            images, labels = images[: n - seen], labels[: n - seen]
        images, labels = images.to(device), labels.to(device)
        if num_classes is None:
            with torch.no_grad():
                num_classes = model(images[:1]).shape[1]
        distances.append(attack(images, labels).distances.cpu())
        seen += len(images)
        bar.update(len(images))
        if n is not None and seen >= n:
            break
    bar.close()
    d = distributed.all_gather_cat(torch.cat(distances) if distances else torch.empty(0))
    if d.numel() == 0:
        raise ValueError("loader yielded no images")
    if distributed.is_distributed():
        num_classes = int(distributed.all_gather_cat(torch.tensor([num_classes or 0])).max())
    return AraResult(
        ara_from_distances(d, num_classes), criterion, num_classes, d, int((~torch.isfinite(d)).sum()), label
    )
