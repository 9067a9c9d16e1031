"""``pyadvk demo`` (what ``make demo`` runs): the whole system on a real dataset that needs no
download, scikit-learn's handwritten digits (16×16).

Trains a small CNN three ways — standard, PGD adversarial training, and the robust additions of
Woods et al. 2019 (half-Huber ReLU, input-gradient penalty with adaptive ψ, half-half adversarial
batches) — then measures each: clean accuracy, PGD robust accuracy, robust accuracy under
AutoAttack with the checks of :func:`pyadvk.metrics.evaluate.evaluate` (whatever they find),
attack-ARA and BTR-ARA (per image the best of L2Min at its full 450 steps and FAB), the mean
probability the targeted explanation walks reach at ρ (paper 1's claim that attacks become
explanations on robust networks, measured), a certified Lipschitz bound, training time. Prints one
table and writes into the output folder: ``ara.png`` (the Acc(ε) curves of all three), an
explanation grid per model, ``fused_step.json`` (the fused PGD step on every backend here) and
``results.json`` with every figure (and each model's full evaluation).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pyadvk import _backend, data, explain, metrics, models, train
from pyadvk._io import save_json
from pyadvk.attacks import PGD
from pyadvk.cli.common import check_output_dir
from pyadvk.lipschitz import AdaptivePsi, lipschitz_bound
from pyadvk.metrics.evaluate import evaluate
from pyadvk.ops import pgd as pgd_ops


def _median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
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


def fused_step_table(device: torch.device, shape: Sequence[int] = (128, 3, 32, 32)) -> list[dict[str, Any]]:
    """The fused in-place PGD step on every backend that runs here, timed, and its largest
    difference to the torch body."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(shape, device=device, generator=gen)
    grad = torch.randn(shape, device=device, generator=gen)
    names = [n for n in _backend.BACKENDS if not pgd_ops.STEP.reason(n, device.type)]
    if device.type == "cpu" and "triton" in names:
        names.remove("triton")  # the interpreter is not a speed
    rows = []
    for norm, eps, alpha in (("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)):
        ref = pgd_ops.pgd_step(x, x, grad, eps=eps, alpha=alpha, norm=norm, backend="torch")
        for name in names:
            out = pgd_ops.pgd_step(x, x, grad, eps=eps, alpha=alpha, norm=norm, backend=name)
            buf = x.clone()
            step = functools.partial(pgd_ops.pgd_step_, buf, x, grad, eps=eps, alpha=alpha, norm=norm, backend=name)
            seconds = _median_time(step, 30, device)
            rows.append(
                {
                    "norm": norm,
                    "backend": name,
                    "ms": 1e3 * seconds,
                    "max_abs_diff_vs_torch": float((out - ref).abs().max()),
                }
            )
    return rows


class _Laps:
    """Wall-clock and process CPU seconds per phase, each from the end of the previous one."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = (time.perf_counter(), time.process_time())

    def lap(self, phase: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[phase], self.cpu[phase] = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now


@torch.no_grad()
def _per_image(
    model: nn.Module,
    loader: DataLoader,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of ``loader``, in order: classified correctly clean, and after ``attack``."""
    clean, robust = [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        clean.append((model(images).argmax(dim=1) == labels).cpu())
        robust.append((model(attack(images, labels)).argmax(dim=1) == labels).cpu())
    return torch.cat(clean), torch.cat(robust)


def configurations(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[nn.Module], Any]]]:
    """The three trainings the demo compares: name -> (activation, model -> training loss)."""
    eps = args.eps
    alpha = 2.5 * eps / args.train_steps
    pgd = functools.partial(train.pgd_adversarial_loss, eps=eps, alpha=alpha, steps=args.train_steps)
    return {
        "standard": ("relu", lambda model: train.standard_loss),
        "pgd-at": ("relu", lambda model: pgd),
        "robust": (
            "half_huber",
            lambda model: train.RobustLoss(
                eps=eps, alpha=alpha, steps=args.train_steps, psi=AdaptivePsi(psi0=args.psi0)
            ),
        ),
    }


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_output_dir("--out", args.out, ("results.json", "ara.png", "fused_step.json"))
    os.makedirs(args.out, exist_ok=True)
    step_backend = _backend.resolve(pgd_ops.STEP, device)
    print(f"pyadvk demo on {device}: fused PGD step backend '{step_backend}' (`pyadvk info` lists every backend)")
    train_set, test_set = data.digits(16, "train"), data.digits(16, "test")
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    test_loader = DataLoader(test_set, batch_size=500)
    eval_loader = DataLoader(
        torch.utils.data.Subset(test_set, range(min(args.ara_images, len(test_set)))), batch_size=500
    )
    aa_set = torch.utils.data.Subset(test_set, range(min(args.eval_images or len(test_set), len(test_set))))
    reach_images, reach_labels = next(iter(DataLoader(test_set, batch_size=args.reach_images)))
    print(f"data: scikit-learn digits, {len(train_set)} train / {len(test_set)} test images, 1×16×16")
    results: dict[str, dict[str, Any]] = {}
    ara_curves = []
    for name, (activation, make_loss) in configurations(args).items():
        torch.manual_seed(args.seed)
        model = models.SmallCNN(1, 10, 16, width=args.width, activation=activation).to(device)
        loss_fn = make_loss(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        print(f"\n[{name}] training {args.epochs} epochs ...")
        laps = _Laps()
        train.AdversarialTrainer(
            model, optimizer, train_loader, loss_fn=loss_fn, epochs=args.epochs, device=device
        ).fit()
        laps.lap("train")
        seconds = laps.wall["train"]
        lap = laps.lap
        model.eval()
        attack = PGD(model, eps=args.eps, alpha=2.5 * args.eps / args.eval_steps, steps=args.eval_steps)
        correct, survived = _per_image(model, test_loader, attack, device)  # one PGD run, both figures
        clean, robust = float(correct.float().mean()), float(survived.float().mean())
        robust_same = float(survived[: len(aa_set)].float().mean())
        aa_loader = DataLoader(aa_set, batch_size=500)
        lap("clean_and_pgd")
        ev = evaluate(model, aa_loader, norm="linf", eps=args.eps, attacks="autoattack")
        lap("autoattack_and_checks")
        eval_seconds = laps.wall["autoattack_and_checks"]
        aras = {}
        for criterion in ("misclassify", "btr"):
            r = metrics.ara(
                model, eval_loader, criterion=criterion, n=None, steps=args.ara_steps, attack="best", label=name
            )
            aras[criterion] = r
            lap(f"ara_{criterion}")
        ara_curves.append(aras["misclassify"])
        bound = float(lipschitz_bound(model, (1, 16, 16)))
        lap("lipschitz")
        walks = explain.adversarial_explanation(
            model, reach_images.to(device), labels=reach_labels.to(device), rho=args.rho
        )
        reached = walks.mean_target_probability(reach_labels.to(device))
        lap("walks")
        results[name] = {
            "clean_accuracy": clean,
            "pgd_accuracy": robust,
            "pgd_accuracy_on_eval_images": robust_same,
            "autoattack_accuracy": ev.robust_accuracy,
            "autoattack_clean_accuracy": ev.clean_accuracy,
            "autoattack_seconds": eval_seconds,
            "evaluation_warnings": [c.name for c in ev.warnings],
            "evaluation": ev.to_dict(),
            "attack_ara": aras["misclassify"].ara,
            "btr_ara": aras["btr"].ara,
            "ara_unbroken": aras["misclassify"].unbroken + aras["btr"].unbroken,
            "ara_fab_wins": sum(w == "fab" for r in aras.values() for w in (r.winner or [])),
            "mean_reached_p_target": reached,
            "lipschitz_bound": bound,
            "train_seconds": seconds,
            "activation": activation,
            "seconds": laps.wall,
            "cpu_seconds": laps.cpu,
        }
        n_grid = min(args.explain_images, len(reach_images))
        grid = [walks.images, walks.probabilities, walks.targets, walks.adversarial, walks.target_probabilities]
        explain.save_explanation_grid(
            os.path.join(args.out, f"explanations_{name}.png"),
            explain.Explanation(*(t[:n_grid] for t in grid)),  # the first images' walks, not walked again
            data.DIGITS_CLASSES,
            title=f"{name}: adversarial explanations (rho={args.rho:g}); mean reached p(target) over "
            f"{len(reach_images)} images: {reached:.2f}",
        )
        lap("grid")
        print(
            f"[{name}] seconds (wall / CPU): "
            + ", ".join(f"{k} {v:.1f} / {laps.cpu[k]:.1f}" for k, v in laps.wall.items())
        )
        warned = ", ".join(c.name for c in ev.warnings) or "none"
        print(
            f"[{name}] clean {clean:.3f}, PGD {robust:.3f}; on the first {ev.n}: PGD {robust_same:.3f}, "
            f"AutoAttack {ev.robust_accuracy:.3f} "
            f"(warnings: {warned}), attack-ARA {aras['misclassify'].ara:.4f}, BTR-ARA {aras['btr'].ara:.4f}, "
            f"mean reached p(target) {reached:.3f}, {seconds:.0f} s"
        )
    metrics.plot_ara(
        ara_curves, os.path.join(args.out, "ara.png"), title="digits: accuracy under minimal L2 perturbations"
    )
    steps = fused_step_table(device)
    save_json(steps, os.path.join(args.out, "fused_step.json"))
    settings = {k: v for k, v in vars(args).items() if k != "run"}
    save_json(
        {"device": str(device), "backend": step_backend, "settings": settings, "models": results},
        os.path.join(args.out, "results.json"),
    )
    header = (
        f"{'model':<9} {'clean':>6} {'PGD':>6} {'PGD@N':>6} {'AA@N':>6} {'attack-ARA':>11} {'BTR-ARA':>8} {'p(t)':>5} "
        f"{'Lipschitz≤':>11} {'train s':>8}  checks"
    )
    print(
        f"\nPGD-{args.eval_steps} on all {len(test_set)} test images; @N: PGD-{args.eval_steps} and AutoAttack "
        f"(standard: APGD-CE, APGD-T, FAB-T, Square) on the first N={len(aa_set)}, L∞ eps={args.eps}; "
        f"ARA over the first {min(args.ara_images, len(test_set))} test images, best of L2Min "
        f"({args.ara_steps} steps) and FAB per image; p(t): mean reached p(target) of the targeted walks "
        f"at rho={args.rho:g} on the first {len(reach_images)} images; fused step backend '{step_backend}'"
        f"\n{header}\n{'-' * len(header)}"
    )
    for name, res in results.items():
        print(
            f"{name:<9} {res['clean_accuracy']:>6.3f} {res['pgd_accuracy']:>6.3f} "
            f"{res['pgd_accuracy_on_eval_images']:>6.3f} {res['autoattack_accuracy']:>6.3f} "
            f"{res['attack_ara']:>11.4f} {res['btr_ara']:>8.4f} {res['mean_reached_p_target']:>5.2f} "
            f"{res['lipschitz_bound']:>11.3g} {res['train_seconds']:>8.0f}  "
            f"{'warn: ' + ', '.join(res['evaluation_warnings']) if res['evaluation_warnings'] else 'pass'}"
        )
    print("\nfused PGD step, 128×3×32×32 float32, in place:")
    for row in steps:
        print(
            f"  {row['norm']:<4} {row['backend']:<7} {row['ms']:8.3f} ms   max |Δ| vs torch "
            f"{row['max_abs_diff_vs_torch']:.1e}"
        )
    print(f"\nwrote {args.out}/: results.json, ara.png, explanations_*.png, fused_step.json")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and compare standard, adversarial and robust models (make demo)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layers")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ budget of training and evaluation attacks")
    p.add_argument("--train-steps", type=int, default=5, help="PGD steps of the training attacks")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps of the evaluation attack")
    p.add_argument(
        "--psi0",
        type=float,
        default=20.0,
        help="ψ0 of the adaptive penalty weight (default 20: the paper's 220 for 3×32×32 CIFAR "
        "images, scaled by the input size, 256/3072, since the penalty is a mean over "
        "input values)",
    )
    p.add_argument("--ara-images", type=int, default=200, help="test images for ARA")
    p.add_argument("--ara-steps", type=int, default=450, help="steps of the minimal-perturbation attack (default 450)")
    p.add_argument(
        "--eval-images",
        type=int,
        default=100,
        help="the first N test images for AutoAttack and its checks (default 100; 0: all)",
    )
    p.add_argument("--rho", type=float, default=0.1, help="RMS radius of the explanation walks (default 0.1)")
    p.add_argument(
        "--reach-images", type=int, default=100, help="test images whose walks give the mean reached p(target)"
    )
    p.add_argument("--explain-images", type=int, default=3, help="images in each explanation grid")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)
