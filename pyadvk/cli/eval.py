"""``pyadvk eval``: robust accuracy under AutoAttack (or APGD, or PGD) with the checks that say when
not to trust it (see :mod:`pyadvk.metrics.evaluate`); writes ``evaluation.json`` and
``evaluation.md``."""

from __future__ import annotations

import argparse
import os

from pyadvk import distributed
from pyadvk._io import atomic_open, save_json
from pyadvk.cli import common
from pyadvk.metrics.evaluate import NORMS, PRESETS, evaluate


def run(args: argparse.Namespace) -> int:
    """Runs the evaluation cascade with its checks, prints it, writes OUT/evaluation.json and .md; returns 0."""
    eps = common.parse_budget("--eps", args.eps)
    sweep = None
    if args.eps_sweep is not None:
        items = [s for s in args.eps_sweep.split(",") if s.strip()]
        sweep = [] if args.eps_sweep.strip() == "none" else [common.parse_budget("--eps-sweep", s) for s in items]
    for flag, value in (("--n", args.n), ("--steps", args.steps), ("--sweep-steps", args.sweep_steps)):
        if value < 1:
            raise common.UserError(f"{flag} must be >= 1, got {value}")
    common.check_output_dir("--out", args.out, ("evaluation.json", "evaluation.md"))
    if not distributed.is_main():  # the evaluation is one process's work: rank 0 does it all
        return 0
    device = common.device_from(args)
    loader, info = common.load_data(args, n=args.n, n_flag="--n")
    model = common.load_model(args, device, info)
    common.check_model_on(model, loader, device)
    ev = evaluate(
        model,
        loader,
        norm=args.norm,
        eps=eps,
        attacks=args.attack,
        eps_sweep=sweep,
        steps=args.steps,
        sweep_steps=args.sweep_steps,
        device=device,
        seed=args.seed,
    )
    result = {"model": args.model, "data": args.data, "split": args.split, "attack": args.attack, **ev.to_dict()}
    save_json(result, os.path.join(args.out, "evaluation.json"))
    with atomic_open(os.path.join(args.out, "evaluation.md"), "w", encoding="utf-8") as f:
        f.write(ev.to_markdown())
    print(f"clean accuracy {ev.clean_accuracy:.4f} on {ev.n} images ({args.norm}, eps {eps:.6g})")
    for a in ev.attacks:
        print(f"  after {a.name:<10} {a.robust_accuracy:.4f}  ({a.broken}/{a.attacked} broken, {a.seconds:.1f} s)")
    print(f"worst-case robust accuracy {ev.robust_accuracy:.4f}")
    for c in ev.checks:
        print(f"  {c.status.upper():<7} {c.name}: {c.message}")
    if not ev.trustworthy:
        print(f"WARNING: {len(ev.warnings)} check(s) say not to trust this evaluation as it stands")
    print(f"wrote {os.path.join(args.out, 'evaluation.json')} and evaluation.md")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``pyadvk eval`` and its arguments."""
    p = sub.add_parser(
        "eval",
        help="robust accuracy under AutoAttack, with checks for masked gradients",
        description="Runs the attacks as a cascade (each on the images every earlier one failed on) on the "
        "first N images, reports clean, per-attack and worst-case robust accuracy, and checks for the "
        "signs of a masked or broken evaluation: a black-box attack succeeding where gradient attacks "
        "failed, an eps sweep that is not monotone or does not reach chance, zero input gradients, "
        "a randomized model. Writes evaluation.json and evaluation.md.",
    )
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_device_arg(p)
    p.add_argument("--norm", default="linf", choices=NORMS, help="threat model (default linf)")
    p.add_argument("--eps", required=True, help="budget: a number or a fraction, e.g. 8/255")
    p.add_argument(
        "--attack",
        default="autoattack",
        choices=PRESETS,
        help="autoattack (APGD-CE, APGD-T, FAB-T, Square; default), apgd (APGD-CE, APGD-T) or pgd",
    )
    p.add_argument("--n", type=int, default=1000, help="the first N images of the split (default 1000)")
    p.add_argument("--steps", type=int, default=100, help="iterations of the gradient attacks (default 100)")
    p.add_argument(
        "--eps-sweep",
        default=None,
        metavar="LIST",
        help="budgets of the sweep check, comma-separated (fractions allowed), or 'none' "
        "(default eps x 0.25, 0.5, 1, 2, 4, 16)",
    )
    p.add_argument("--sweep-steps", type=int, default=20, help="iterations of the sweep's attack (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts and searches (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="write evaluation.json and evaluation.md here")
    p.set_defaults(run=run)
