"""End to end: a PGD-10 attack and one PGD adversarial-training step on a CIFAR-size ResNet-18,
and a PGD-10 attack on an ImageNet-size ResNet-50 (random weights: timing only).

Rows per model (``impl``):

- ``floor``: 10 bare forward + input-gradient backward passes on the same batch, nothing else;
  the cost no PGD-10 implementation can go below. Each attack row reports its overhead over it.
- ``torchattacks-reimpl``: torchattacks' PGD loop re-implemented with plain torch ops
  (:func:`benchmarks.baselines.torchattacks_pgd`: fresh leaf each step, 5-op unfused update).
- ``pyadvk``: :class:`pyadvk.attacks.PGD` in exact fp32 mode (fused in-place step).
- ``pyadvk-fast``: the same with channels_last and bf16 autocast, plus CUDA-graph capture on a
  GPU. Its robust accuracy is reported beside the fp32 one.
- ``torchattacks`` / ``foolbox``: the peer libraries themselves when installed (``pip install
  -e .[peers]``); their adversarial images are checked against pyadvk's before any time is kept.

All attacks start from the image (no random start) so the exact modes must agree. Agreement is
checked before any time is kept: one step of each exact implementation must give pyadvk's image
to fp32 rounding (max |Δ| ≤ 1e-5). After ten steps the images can part on some pixels (a 1-ulp
difference in the projection changes the next gradient slightly, and sign() flips entries near
zero, more so on an untrained network): the share of pixels that differ after ten steps and each
implementation's robust accuracy are reported beside the time. Labels are the model's own clean
predictions, so clean accuracy is 100% and "robust accuracy" is the share of predictions the
attack did not flip.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from benchmarks import baselines
from benchmarks.conftest import DEVICE, QUICK, impls, record, run_benchmark, sizes
from pyadvk import models
from pyadvk.attacks import PGD

GPU = DEVICE.type == "cuda"
SIZES = {  # name: (architecture, batch on GPU, batch on CPU, image size)
    "cifar-resnet18": ("resnet18", 512, 16, 32),
    "imagenet-resnet50": ("resnet50", 64, 2, 224),
}
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
ATTACK_IMPLS = ["floor", "torchattacks-reimpl", "pyadvk", "pyadvk-fast", "torchattacks", "foolbox"]
AGREE_TOL = 1e-5  # one step must agree to this (fp32 rounding); a pixel "differs" above it


@functools.cache
def setup(size: str):
    arch, gpu_batch, cpu_batch, side = SIZES[size]
    batch = gpu_batch if GPU else (cpu_batch if not QUICK else 2)
    torch.manual_seed(0)
    model = models.build(arch).to(DEVICE).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # attacks need input gradients only
    images = torch.rand(batch, 3, side, side, device=DEVICE)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model, images, labels


def peer_attack(name: str, model: nn.Module, steps: int = STEPS):
    """The installed peer's PGD (no random start) as ``fn(images, labels)``, or None."""
    if name == "torchattacks":
        try:
            import torchattacks
        except ImportError:
            return None
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)
        return atk
    try:
        import foolbox
    except ImportError:
        return None
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    atk = foolbox.attacks.LinfPGD(abs_stepsize=ALPHA, steps=steps, random_start=False)
    return lambda x, y: atk(fmodel, x, y, epsilons=EPS)[1]


def attack_fn(impl: str, model: nn.Module, steps: int = STEPS):
    if impl == "floor":

        def floor(x, y):
            loss_fn = nn.CrossEntropyLoss()
            for _ in range(steps):
                xg = x.detach().requires_grad_(True)
                torch.autograd.grad(loss_fn(model(xg), y), xg)
            return x

        return floor
    if impl == "torchattacks-reimpl":
        return functools.partial(baselines.torchattacks_pgd, model, eps=EPS, alpha=ALPHA, steps=steps)
    if impl == "pyadvk":
        return PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)
    if impl == "pyadvk-fast":
        return PGD(
            model,
            eps=EPS,
            alpha=ALPHA,
            steps=steps,
            random_start=False,
            channels_last=True,
            autocast=torch.bfloat16,
            cuda_graph=GPU,
        )
    return peer_attack(impl, model, steps)


@functools.cache
def exact_adversarial(size: str, steps: int = STEPS) -> torch.Tensor:
    """pyadvk's exact fp32 PGD images after ``steps`` steps, the reference every other exact
    implementation must match."""
    model, images, labels = setup(size)
    return PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)(images, labels)


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs() > AGREE_TOL).float().mean().item()


def robust_accuracy(model, adv, labels) -> float:
    with torch.no_grad():
        return (model(adv).argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("impl", impls(ATTACK_IMPLS))
@pytest.mark.parametrize("size", sizes(SIZES))
def test_pgd10(benchmark, size, impl):
    model, images, labels = setup(size)
    if impl == "pyadvk-fast":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fn = attack_fn(impl, model)
    if fn is None:
        pytest.skip(f"{impl} is not installed (pip install -e .[peers])")
    extra = {}
    if impl != "floor":
        adv = fn(images, labels)
        if impl not in ("pyadvk", "pyadvk-fast"):  # pyadvk's exact mode is the reference itself
            one = attack_fn(impl, model, steps=1)(images, labels)
            gap = (one.float() - exact_adversarial(size, 1)).abs().max().item()
            if gap > AGREE_TOL:
                pytest.fail(
                    f"one step of {impl} differs from pyadvk's by {gap:.2e} (> {AGREE_TOL}): not timing different work"
                )
            diff = disagreement(adv, exact_adversarial(size))
            extra.update(
                one_step_max_diff=gap,
                disagreement_vs_pyadvk=diff,
                note_pixels_differing_after_10_steps=f"{100 * diff:.2f}%",
            )
        extra["robust_acc"] = robust_accuracy(model, adv, labels)
    times = run_benchmark(benchmark, lambda: fn(images, labels), max_seconds=5.0, min_rounds=3)
    batch = images.shape[0]
    record(
        benchmark,
        times,
        op="pgd10",
        size=size,
        shape=images.shape,
        impl=impl,
        images_per_s=batch / sorted(times)[len(times) // 2],
        batch=batch,
        **extra,
    )


@pytest.mark.parametrize("impl", impls(["torchattacks-reimpl", "pyadvk"]))
@pytest.mark.parametrize("size", [s for s in sizes(SIZES) if s == "cifar-resnet18"])
def test_adversarial_training_step(benchmark, size, impl):
    """One Madry step: PGD-10 on the batch (model in eval mode for the attack, input gradients
    only), then cross-entropy on the adversarial batch, backward and an SGD step."""
    arch, _, _, _ = SIZES[size]
    _, images, labels = setup(size)
    torch.manual_seed(0)
    model = models.build(arch).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    attack = attack_fn(impl, model)

    def step():
        model.eval()
        adv = attack(images, labels)
        model.train()
        loss = nn.functional.cross_entropy(model(adv), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = run_benchmark(benchmark, step, max_seconds=5.0, min_rounds=3)
    batch = images.shape[0]
    record(
        benchmark,
        times,
        op="at_step",
        size=size,
        shape=images.shape,
        impl=impl,
        images_per_s=batch / sorted(times)[len(times) // 2],
        batch=batch,
    )
