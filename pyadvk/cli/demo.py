"""``pyadvk demo``: a PGD attack on a small CNN with every available backend, in one table:
time per attack step (forward + backward + fused step), time of the fused step alone, and the
largest difference of the adversarial images to the torch body's."""

from __future__ import annotations

import time

import torch
from torch import nn

from pyadvk import _backend
from pyadvk.attacks import PGD, PGDL2
from pyadvk.ops import pgd as pgd_ops


def small_cnn(channels: int = 3, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.LazyLinear(classes),
    )


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = small_cnn().to(device)
    images = torch.rand(args.batch, 3, 32, 32, device=device)
    model(images)  # materialize the lazy layer
    model.eval()
    labels = model(images).argmax(1)
    names = [n for n in _backend.BACKENDS if not pgd_ops.STEP.reason(n, device.type)]
    if not args.interpreted_triton and device.type == "cpu" and "triton" in names:
        names.remove("triton")  # the interpreter is far too slow for a timing table
    print(f"PGD-{args.steps} on a small CNN, batch {tuple(images.shape)}, {device}")
    print(f"backends here: {', '.join(names)}  (pyadvk info says why others are missing)")
    header = f"{'attack':<8} {'backend':<8} {'ms/attack step':>15} {'ms/fused step':>14} {'max |Δ| vs torch':>17}"
    print(header)
    print("-" * len(header))
    for attack_cls, eps, alpha in ((PGD, 8 / 255, 2 / 255), (PGDL2, 0.5, 0.1)):
        reference = None
        for name in ["torch"] + [n for n in names if n != "torch"]:
            attack = attack_cls(model, eps=eps, alpha=alpha, steps=args.steps, random_start=False,
                                backend=name)
            adv = attack(images, labels)
            per_attack = _median_time(lambda: attack(images, labels), args.repeats, device)
            grad = torch.randn_like(images)
            x = images.clone()
            per_step = _median_time(
                lambda: pgd_ops.pgd_step_(x, images, grad, eps=eps, alpha=alpha, norm=attack.norm,
                                          backend=name),
                max(args.repeats, 20), device,
            )
            reference = adv if reference is None else reference
            diff = (adv - reference).abs().max().item()
            print(f"{attack_cls.__name__:<8} {name:<8} {1e3 * per_attack / args.steps:>15.3f} "
                  f"{1e3 * per_step:>14.4f} {diff:>17.2e}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the demo: PGD on a small CNN with every backend")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--batch", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--interpreted-triton", action="store_true",
                   help="also time the Triton bodies under TRITON_INTERPRET=1 on CPU (slow)")
    p.set_defaults(run=run)
