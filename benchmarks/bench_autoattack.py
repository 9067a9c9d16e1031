"""AutoAttack (standard, L∞ ε = 0.1) end to end: pyadvk against torchattacks' AutoAttack in the same
run, on the same model and images: a small CNN (:class:`pyadvk.models.SmallCNN`, width 16) trained
in the setup for a few seconds on the 8×8 digits, and the first 300 test digits (20 with
``--quick``).

Rows (``impl``):

- ``torchattacks``: torchattacks' own components composed as the published standard version
  (``MultiAttack`` of APGD-CE, APGD-T with 9 targets and multi-targeted FAB at 100 steps each, and
  Square with 5000 queries): the same work as pyadvk's, like for like.
- ``torchattacks-as-shipped``: ``torchattacks.AutoAttack(model, norm="Linf", eps=0.1,
  version="standard", n_classes=10, seed=0)`` exactly as the library ships it, which builds its
  APGD, APGD-T and FAB with their default 10 steps instead of the published 100 (a cheaper, weaker
  evaluation; its robust accuracy is reported beside the time).

Both need torchattacks importable (a peer, never a dependency: ``pip install --no-deps
torchattacks`` for the run) and are skipped otherwise. They run first so the pyadvk rows can
report their speed against both.
- ``pyadvk``: :class:`pyadvk.attacks.autoattack.AutoAttack` in exact fp32 mode.
- ``pyadvk-fast``: the same with channels_last and bf16 autocast in the APGD components, plus
  CUDA-graph capture on a GPU.

Each row reports images/s and the robust accuracy it measured (the two libraries draw different
random numbers, so the accuracies can differ by a few images; both are upper bounds on the true
robust accuracy, and the lower one is the stronger evaluation), and the pyadvk rows their
per-component robust accuracy and seconds. On a CPU the attacks run on one intra-op thread (the
row's ``threads``): for 8×8 images OpenMP's fork/join costs more than it saves, a hundredfold on
a loaded machine. One evaluation takes minutes on a CPU, so each row
times a single call (the figure is that call's wall-clock time, after a full evaluation of the
first few images as warm-up).
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
from torch import nn

from benchmarks.conftest import DEVICE, QUICK, impls, record, sync
from pyadvk import data, models
from pyadvk.attacks.autoattack import AutoAttack

GPU = DEVICE.type == "cuda"
SIZES = {"digits8-300": 300}  # name: number of test images
EPS = 0.1
AA_IMPLS = ["torchattacks", "torchattacks-as-shipped", "pyadvk", "pyadvk-fast"]
_peer_seconds: dict[str, float] = {}


@functools.cache
def setup(size: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The trained model (eval mode, parameters frozen) and the images and labels of ``size``."""
    torch.manual_seed(0)
    train, test = data.digits(size=8, split="train"), data.digits(size=8, split="test")
    model = models.SmallCNN(in_channels=1, num_classes=10, input_size=8, width=16)
    images, labels = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), 128):
            batch = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = model.to(DEVICE).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n = 20 if QUICK else SIZES[size]
    x, y = test.tensors
    return model, x[:n].to(DEVICE), y[:n].to(DEVICE)


def attack_fn(impl: str, model: nn.Module):
    if impl.startswith("torchattacks"):
        try:
            import torchattacks
        except ImportError:
            return None
        if impl == "torchattacks-as-shipped":
            return torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
        common = dict(norm="Linf", eps=EPS, seed=0)
        return torchattacks.MultiAttack(
            [
                torchattacks.APGD(model, steps=100, loss="ce", n_restarts=1, **common),
                torchattacks.APGDT(model, steps=100, n_classes=10, n_restarts=1, **common),
                torchattacks.FAB(model, steps=100, multi_targeted=True, n_classes=10, n_restarts=1, **common),
                torchattacks.Square(model, n_queries=5000, n_restarts=1, **common),
            ]
        )
    if impl == "pyadvk":
        return AutoAttack(model, norm="linf", eps=EPS, version="standard", n_classes=10, seed=0)
    return AutoAttack(
        model,
        norm="linf",
        eps=EPS,
        version="standard",
        n_classes=10,
        seed=0,
        autocast=torch.bfloat16,
        channels_last=True,
        cuda_graph=GPU,
    )


def robust_accuracy(model: nn.Module, adv: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(adv).argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("impl", impls(AA_IMPLS))
@pytest.mark.parametrize("size", list(SIZES))
def test_autoattack(benchmark, size, impl):
    model, images, labels = setup(size)
    if impl == "pyadvk-fast":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    attack = attack_fn(impl, model)
    if attack is None:
        pytest.skip(f"{impl} is not installed (pip install --no-deps torchattacks)")
    threads = torch.get_num_threads()
    if not GPU:  # 8×8 images in batches of a few hundred: OpenMP fork/join costs more than it saves
        torch.set_num_threads(1)
    try:
        measure(benchmark, size, impl, model, images, labels, attack)
    finally:
        torch.set_num_threads(threads)


def measure(benchmark, size, impl, model, images, labels, attack) -> None:
    attack(images[:4], labels[:4])  # warm-up: first calls, allocations, CUDA graph capture
    sync()
    out = {}

    def run():
        t0 = time.perf_counter()
        out["adv"] = attack(images, labels)
        sync()
        out["seconds"] = time.perf_counter() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = out["seconds"]
    adv = out["adv"]
    delta = (adv.float() - images.float()).flatten(1).abs().amax(1)
    if not (delta <= EPS + 1e-5).all() or adv.min() < 0 or adv.max() > 1:
        pytest.fail(f"{impl} returned images outside the L∞ ball of radius {EPS} or the box [0, 1]")
    n = images.shape[0]
    extra: dict = dict(robust_acc=robust_accuracy(model, adv, labels), batch=n, images_per_s=n / seconds)
    with torch.no_grad():
        extra["clean_acc"] = (model(images).argmax(1) == labels).float().mean().item()
    if impl.startswith("torchattacks"):
        _peer_seconds[(size, impl)] = seconds
    else:
        report = attack.report
        extra["components"] = [c.__dict__ for c in report.components]
        extra["note_components"] = ", ".join(
            f"{c.name} {100 * c.robust_accuracy:.1f}% in {c.seconds:.1f} s" for c in report.components
        )
        for peer in ("torchattacks", "torchattacks-as-shipped"):
            if (size, peer) in _peer_seconds:
                ratio = _peer_seconds[(size, peer)] / seconds
                extra[f"speedup_vs_{peer.replace('-', '_')}"] = ratio
                extra[f"note_vs_{peer}"] = f"{ratio:.2f}x images/s"
    record(benchmark, [seconds], op="autoattack", case="linf", size=size, shape=images.shape, impl=impl, **extra)
