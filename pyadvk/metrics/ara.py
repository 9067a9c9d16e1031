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

Which attack measures ``r_i`` (``attack=``):

* ``"best"`` (default): per image the smallest successful RMS distance over :class:`L2Min` and
  untargeted L2 FAB (Croce & Hein 2020; a boundary projection, exact on a linear model). A smaller
  successful perturbation is always a valid, tighter measurement; FAB's images are re-checked with
  one forward pass before they count. ``AraResult.winner`` says which attack won each image (ties go
  to L2Min). For ``criterion="btr"`` FAB does not apply (the set ``softmax[label] ≤ 1/C`` is no
  decision boundary between classes), so ``"best"`` is L2Min alone and ``AraResult.note`` says so.
* ``"reference"``: the paper's procedure alone: ``L2Min(procedure="reference")`` on the first ``n``
  images of a seeded permutation of ``loader.dataset`` (seed 1776, as the reference code), and the
  area as the reference code's 1000-bin histogram sum (:func:`ara_histogram`).
* ``"l2min"``: pyadvk's box-respecting :class:`L2Min` alone on the loader's first ``n`` images.

``docs/ara.md`` gives the measured effect of each choice.
"""

from __future__ import annotations

import warnings
from collections.abc import Sized
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pyadvk import _checks, distributed
from pyadvk._modules import guarded, model_device, ordinary
from pyadvk.attacks.fab import FAB
from pyadvk.attacks.l2min import CRITERIA, PROCEDURES, L2Min
from pyadvk.nn.normalize import Normalize, NormalizeArg, with_normalization

ATTACKS = ("best", "reference", "l2min")
REFERENCE_SEED = 1776  # the reference code's torch.manual_seed before its test-set permutation


def check_attack_normalization(attack: object, model: nn.Module) -> None:
    """Refuses an attack built on the bare model when a metric was given ``normalize=``: ``model``
    is then ``Normalize ∘ bare``, and an attack whose model is ``bare`` itself would attack the
    model on pixels it reads as normalized values."""
    if not (isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize)):
        return
    bare = model[1]
    models = getattr(attack, "models", None) or [getattr(attack, "model", None)]
    if any(m is bare for m in models):
        raise ValueError(
            f"attack {type(attack).__name__} was built on the model without normalization, but normalize= was "
            "given: build the attack with the same normalize=(mean, std) (or on Normalize(mean, std) ∘ model)"
        )


class _Counting(nn.Module):
    """``model`` that calls ``tick()`` before each forward pass (progress of an attack whose steps
    cannot be observed otherwise)."""

    def __init__(self, model: nn.Module, tick) -> None:
        super().__init__()
        self.model = model
        self.tick = tick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tick()
        return self.model(x)


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


def ara_histogram(distances: torch.Tensor, num_classes: int, bins: int = 1000) -> float:
    """The reference code's ARA: a Riemann sum over a ``bins``-bin histogram of the distances on
    ``[0, max r]``, in float32: ``gap · Σ_b max(0, 1 − cumsum(hist)_b / n − 1/C)``,
    ``gap = max r / bins``. It approaches :func:`ara_from_distances` from below as ``bins`` grows."""
    _checks.integer("bins", bins, low=1)
    r = distances.detach().float().cpu()
    n = r.numel()
    if n == 0:
        raise ValueError("ARA needs at least one image")
    if not torch.isfinite(r).all():
        raise ValueError("ara_histogram needs finite distances (the reference code breaks every image)")
    top = float(r.max())
    if top == 0.0:
        return 0.0
    hist = r.histc(bins, min=0, max=top)
    return float((top / bins) * (1 - hist.cumsum(0) / n).add_(-1.0 / num_classes).clamp_(min=0).sum())


def reference_indices(size: int, n: int | None, seed: int = REFERENCE_SEED) -> torch.Tensor:
    """The first ``n`` (all for ``None``) of ``torch.randperm(size)`` after ``torch.manual_seed(seed)``:
    the reference code's ARA images. The global random state is not touched."""
    _checks.integer("size", size, low=1)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(_checks.integer("seed", seed)))
    return perm if n is None else perm[:n]


@dataclass
class AraResult:
    """ARA with everything it was computed from, and its accuracy curve.

    ``attack``: "best", "reference" or "l2min"; ``winner``: per image the attack whose distance
    was kept ("l2min", "fab", or "none" where neither broke it), for ``attack="best"``;
    ``late``: images broken only after half of L2Min's steps or never (the reference code's check);
    ``integral``: "exact" (:func:`ara_from_distances`) or "histogram" (:func:`ara_histogram`);
    ``note``: why an attack was left out, if one was."""

    ara: float
    criterion: str
    num_classes: int
    distances: torch.Tensor
    unbroken: int
    label: str = ""
    attack: str = "l2min"
    winner: list[str] | None = None
    late: int = 0
    integral: str = "exact"
    note: str = ""
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
            "attack": self.attack,
            "integral": self.integral,
            "late": self.late,
            "winner_counts": self.winner_counts,
            "note": self.note,
        }

    @property
    def winner_counts(self) -> dict[str, int]:
        """How many images each attack won (empty unless ``attack="best"``)."""
        counts: dict[str, int] = {}
        for w in self.winner or []:
            counts[w] = counts.get(w, 0) + 1
        return counts

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


def _fab(model: nn.Module, steps: int) -> FAB:
    return FAB(model, norm="l2", steps=steps, targeted=False, restarts=1, seed=0, lower=0.0, upper=1.0)


def _best_of(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, l2min_distances: torch.Tensor, fab):
    """Per image the smaller successful distance of L2Min and FAB (FAB's images re-checked), and
    the winner's name."""
    found = fab.minimal(images, labels)
    with torch.no_grad():
        confirmed = found.broken & (model(found.images).argmax(dim=1) != labels)
        inside = (found.images >= 0.0).flatten(1).all(1) & (found.images <= 1.0).flatten(1).all(1)
    valid = (confirmed & inside).cpu()
    fab_d = torch.where(valid, found.rms_distances.detach().to(l2min_distances), float("inf"))
    fab_wins = fab_d < l2min_distances
    d = torch.where(fab_wins, fab_d, l2min_distances)
    names = {(True, True): "fab", (False, True): "l2min", (False, False): "none"}
    winner = [names[key] for key in zip(fab_wins.tolist(), torch.isfinite(d).tolist())]
    return d, winner


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
    attack: str = "best",
    procedure: str | None = None,
    seed: int = REFERENCE_SEED,
    fab_steps: int = 100,
    normalize: NormalizeArg = None,
) -> AraResult:
    """ARA of ``model`` on the first ``n`` images of ``loader`` (all of them for ``n=None``; see
    the module docstring).

    ``attack``: "best" (L2Min and FAB, the smaller distance per image), "reference" (the paper's
    procedure alone) or "l2min" (pyadvk's L2Min alone). ``procedure``: L2Min's procedure,
    "pyadvk" or "reference" (default: "reference" for ``attack="reference"``, else "pyadvk");
    with "reference" the images are the first ``n`` of a ``seed``-ed permutation of
    ``loader.dataset`` (batches of ``loader.batch_size``) and the area is the reference's histogram
    sum. ``steps``, ``budget``, ``momentum``: L2Min's; ``fab_steps``: FAB's (for "best").

    ``num_classes`` defaults to the width of the model's logits. The model is used as it is (call
    ``model.eval()`` first for a model with batch norm or dropout). In a torch.distributed process
    group every rank attacks its own loader and the distances are gathered: build the loaders with
    :func:`pyadvk.distributed.shard_loader` (which takes ``n``) and pass ``n=None``; the result is
    the same as one process on the same images.

    ``normalize=(mean, std)``: the model expects ``(x − mean) / std`` of the loader's images in
    [0, 1]; the attacks and the distances stay in pixel space. The model's buffers and train/eval
    flags are left as found.

    With ``progress``, one bar counts the images (its last line is kept) and a second one the
    steps of the batch being attacked: L2Min's N + 1 evaluations, then FAB's model passes.
    """
    criterion = _checks.choice("criterion", criterion, CRITERIA)
    attack = _checks.choice("attack", attack, ATTACKS)
    if procedure is None:
        procedure = "reference" if attack == "reference" else "pyadvk"
    procedure = _checks.choice("procedure", procedure, PROCEDURES)
    if attack == "reference" and procedure != "reference":
        raise ValueError(f"attack='reference' is the reference procedure; got procedure={procedure!r}")
    _checks.integer("seed", seed)
    _checks.integer("fab_steps", fab_steps, low=1)
    if n is not None:
        _checks.integer("n", n, low=1)
        if distributed.is_distributed():
            raise ValueError(
                "in a process group pass n=None and limit the images with "
                "pyadvk.distributed.shard_loader(dataset, batch_size, n=...)"
            )
    distributed.check_loader(loader)
    if procedure == "reference":
        if distributed.is_distributed():
            raise ValueError("procedure='reference' runs in one process (its images are a permutation of the dataset)")
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"procedure='reference' needs a DataLoader over a map-style dataset, got {type(loader).__name__}"
            )
        loader = DataLoader(
            Subset(dataset, reference_indices(len(dataset), n, seed).tolist()),
            batch_size=loader.batch_size or 1,
            collate_fn=loader.collate_fn,
        )
    device = torch.device(device) if device is not None else model_device(model)
    model = with_normalization(model, normalize)
    show = progress and distributed.is_main()
    sampler = getattr(loader, "sampler", None)  # an IterableDataset's has no len(): no total then
    total = n if n is not None else len(sampler) if isinstance(sampler, Sized) else None
    bar = tqdm(total=total, desc=f"{criterion}-ARA ({attack})", unit="img", disable=not show)
    step_bar = tqdm(desc="L2Min", unit="step", leave=False, disable=not show)
    l2min = L2Min(
        model,
        steps=steps,
        budget=budget,
        momentum=momentum,
        criterion=criterion,
        procedure=procedure,
        on_step=lambda k: step_bar.update(1),
    )
    use_fab = attack == "best" and criterion == "misclassify"
    fab = _fab(_Counting(model, lambda: step_bar.update(1)), fab_steps) if use_fab else None
    note = (
        "criterion 'btr': FAB does not apply (no decision boundary between classes); L2Min alone"
        if (attack == "best" and not use_fab)
        else ""
    )
    distances, winners = [], []
    late = 0
    seen = 0
    with guarded([model]):
        for images, labels in loader:
            if n is not None:
                images, labels = images[: n - seen], labels[: n - seen]
            images, labels = ordinary(images.to(device)), ordinary(labels.to(device))
            if num_classes is None:
                with torch.no_grad():
                    num_classes = model(images[:1]).shape[1]
            step_bar.reset(total=steps + 1)
            step_bar.set_description(f"L2Min ({len(images)} images)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # counted in ``late`` and warned about once below
                found = l2min(images, labels)
            d = found.distances.cpu()
            late += int(found.late.sum())
            if fab is not None:
                step_bar.total = None  # FAB's passes are counted, not announced
                step_bar.reset()
                step_bar.set_description(f"FAB ({len(images)} images, model passes)")
                d, winner = _best_of(model, images, labels, d, fab)
                winners += winner
            distances.append(d)
            seen += len(images)
            bar.update(len(images))
            if n is not None and seen >= n:
                break
    step_bar.close()
    bar.close()
    d = distributed.all_gather_cat(torch.cat(distances) if distances else torch.empty(0))
    if d.numel() == 0:
        raise ValueError("loader yielded no images")
    if distributed.is_distributed():
        num_classes = int(distributed.all_gather_cat(torch.tensor([num_classes or 0])).max())
        late = int(distributed.all_reduce_sum([late])[0])
        if fab is not None:
            codes = torch.tensor([("l2min", "fab", "none").index(w) for w in winners], dtype=torch.int64)
            winners = [("l2min", "fab", "none")[int(c)] for c in distributed.all_gather_cat(codes)]
    if procedure == "reference" and late:
        warnings.warn(
            f"{late} of {d.numel()} images broke after the first half of L2Min's {steps} steps or never "
            "(the reference code stops with an error here); increase budget or steps",
            stacklevel=2,
        )
    unbroken = int((~torch.isfinite(d)).sum())
    histogram = procedure == "reference" and unbroken == 0
    assert num_classes is not None  # from the first batch's logits (gathered over the ranks)
    value = ara_histogram(d, num_classes) if histogram else ara_from_distances(d, num_classes)
    return AraResult(
        value,
        criterion,
        num_classes,
        d,
        unbroken,
        label,
        attack=attack,
        winner=winners if fab is not None else None,
        late=late,
        integral="histogram" if histogram else "exact",
        note=note,
    )
