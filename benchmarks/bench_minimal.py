"""Minimal L2 perturbations: distances and time of pyadvk's FAB (untargeted and targeted), DeepFool
and L2Min against Foolbox's DDN and FMN (when ``import foolbox`` works; it is not a dependency).

Sizes (``SIZES``):

- ``linear-5class``: ``nn.Linear`` on 3×8×8 inputs in [0.3, 0.7], 5 classes, 32 images labelled by
  the model: the exact distance is ``min_j (z_y − z_j) / ‖w_y − w_j‖₂`` (the box is never active),
  so each row also reports its per-image ratio to the exact distance;
- ``digits-cnn``: :class:`pyadvk.models.SmallCNN` (width 16) trained here for 4 epochs on the 8×8
  digits (a few seconds), 32 test images it classifies correctly.

Every method runs once on the same images before any timing; each row reports, per image, the
ratio of the method's L2 distance to the smallest distance any method found (median, max), the
share of images it broke, and the time per call. Iteration counts: FAB, DDN and FMN 100 steps,
DeepFool at most 50, L2Min its procedure's 450.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from benchmarks.conftest import DEVICE, QUICK, impls, record, run_benchmark, sizes
from pyadvk import data, models
from pyadvk.attacks import L2Min
from pyadvk.attacks.deepfool import DeepFool
from pyadvk.attacks.fab import FAB

SIZES = {"linear-5class": (3, 8, 8), "digits-cnn": (1, 8, 8)}
BATCH = 32
STEPS = 100
METHODS = ["l2min", "fab", "fab-t", "deepfool", "foolbox-ddn", "foolbox-fmn"]


def linear_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 5)).to(DEVICE).eval()
    images = 0.3 + 0.4 * torch.rand(BATCH, 3, 8, 8, device=DEVICE)
    with torch.no_grad():
        logits = model(images)
    labels = logits.argmax(1)
    weight = model[1].weight.detach()
    margins = logits.gather(1, labels[:, None]) - logits
    dual = (weight[labels][:, None] - weight[None]).norm(dim=2)
    exact = (margins / dual).scatter(1, labels[:, None], math.inf).min(1).values
    return model, images, labels, exact


def digits_setup():
    torch.manual_seed(0)
    train = data.digits(size=8, split="train")
    test = data.digits(size=8, split="test")
    model = models.SmallCNN(in_channels=1, num_classes=10, input_size=8, width=16).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    for _ in range(4):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images, labels = (t.to(DEVICE) for t in test.tensors)
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    accuracy = correct.float().mean().item()
    return model, images[correct][:BATCH], labels[correct][:BATCH], accuracy


@functools.cache
def setup(size: str):
    """(model, images, labels, extra): extra holds the exact distances (linear) or the accuracy."""
    if size == "linear-5class":
        model, images, labels, exact = linear_setup()
        return model, images, labels, {"exact": exact}
    model, images, labels, accuracy = digits_setup()
    return model, images, labels, {"clean_accuracy": accuracy}


def method(name: str, model: nn.Module):
    """``fn(images, labels) -> (adv_images, L2 distances (B,), inf where not broken)``, or None
    where the peer library is not installed."""
    if name == "l2min":
        attack = L2Min(model)

        def run(x, y):
            res = attack(x, y)
            return res.images, res.distances * math.sqrt(x[0].numel())

        return run
    if name in ("fab", "fab-t", "deepfool"):
        if name == "deepfool":
            attack = DeepFool(model, norm="l2")
        else:
            attack = FAB(model, norm="l2", targeted=name == "fab-t", steps=STEPS)

        def run(x, y):
            res = attack.minimal(x, y)
            return res.images, res.distances

        return run
    try:
        import foolbox
    except ImportError:
        return None
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    if name == "foolbox-ddn":
        attack = foolbox.attacks.DDNAttack(steps=STEPS)
    else:
        attack = foolbox.attacks.L2FMNAttack(steps=STEPS)

    def run(x, y):
        raw, _, _ = attack(fmodel, x, y, epsilons=None)
        with torch.no_grad():
            broken = model(raw).argmax(1) != y
        return raw, torch.where(broken, (raw - x).flatten(1).norm(dim=1), math.inf)

    return run


@functools.cache
def distances(size: str) -> dict[str, torch.Tensor]:
    """Every available method's L2 distances on the size's images (one untimed run each)."""
    model, images, labels, _ = setup(size)
    out = {}
    for name in METHODS:
        fn = method(name, model)
        if fn is not None:
            adv, dist = fn(images, labels)
            with torch.no_grad():
                fooled = model(adv).argmax(1) != labels
            if not fooled[torch.isfinite(dist)].all():
                raise AssertionError(f"{name} reports an image broken that the model classifies correctly")
            out[name] = dist.float().cpu()
    return out


def ratio_stats(dist: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    keep = torch.isfinite(reference) & (reference > 0)
    ratio = dist[keep] / reference[keep]
    return {"median": ratio.median().item(), "max": ratio.max().item()}


@pytest.mark.parametrize("impl", impls(METHODS))
@pytest.mark.parametrize("size", sizes(SIZES))
def test_minimal_l2(benchmark, size, impl):
    model, images, labels, info = setup(size)
    fn = method(impl, model)
    if fn is None:
        pytest.skip(f"{impl}: foolbox is not installed (pip install --no-deps foolbox eagerpy, for this run only)")
    found = distances(size)
    best = torch.stack(list(found.values())).min(0).values
    mine = found[impl]
    vs_best = ratio_stats(mine, best)
    extra = dict(
        ratio_to_best_median=vs_best["median"],
        ratio_to_best_max=vs_best["max"],
        broken=torch.isfinite(mine).float().mean().item(),
        median_l2=mine.median().item(),
        methods_compared=",".join(found),
    )
    if "exact" in info:
        vs_exact = ratio_stats(mine, info["exact"].cpu())
        extra.update(ratio_to_exact_median=vs_exact["median"], ratio_to_exact_max=vs_exact["max"])
    else:
        extra.update(clean_accuracy=info["clean_accuracy"])
    times = run_benchmark(benchmark, lambda: fn(images, labels), max_seconds=1.0 if not QUICK else 0.5, min_rounds=1)
    median = sorted(times)[len(times) // 2]
    record(
        benchmark,
        times,
        op="minimal_l2",
        size=size,
        shape=images.shape,
        impl=impl,
        images_per_s=images.shape[0] / median,
        batch=images.shape[0],
        **extra,
    )
