"""``pyadvk ara``: the Accuracy-Robustness Area of a model on a dataset (JSON + PNG curve)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sized
from typing import cast

from pyadvk import distributed, metrics
from pyadvk._io import save_json
from pyadvk.cli import common


def run(args: argparse.Namespace) -> int:
    """Computes the ARA of --model on --data (both criteria by default), prints it, writes
    OUT/ara.json and ara.png; returns 0."""
    device = common.device_from(args)
    if args.num_images < 1:
        raise common.UserError(f"--num-images must be >= 1, got {args.num_images}")
    common.check_output_dir("--out", args.out, ("ara.json", "ara.png"))
    reference = args.attack == "reference"
    if reference and distributed.is_distributed():
        raise common.UserError("--attack reference runs in one process (its images are a permutation of the split)")
    # the reference procedure takes the first N of a seeded permutation of the whole split
    loader, info = common.load_data(args, n=None if reference else args.num_images)
    if reference:
        common.note_fewer_images("--num-images", args.num_images, len(cast(Sized, loader.dataset)), args, args.split)
    model = common.load_model(args, device, info)
    num_classes = common.check_model_on(model, loader, device)
    criteria = ("misclassify", "btr") if args.criterion == "both" else (args.criterion,)
    results = [
        metrics.ara(
            model,
            loader,
            criterion=c,
            n=args.num_images if reference else None,
            num_classes=num_classes,
            steps=args.steps,
            budget=args.budget,
            device=device,
            label=os.path.basename(args.model),
            attack=args.attack,
        )
        for c in criteria
    ]
    for r in results:
        won = ", ".join(f"{k} {v}" for k, v in sorted(r.winner_counts.items()))
        common.say(
            f"{r.criterion}-ARA {r.ara:.5f}  (attack {r.attack}, n={r.distances.numel()}, "
            f"Acc(0) {r.unperturbed_accuracy:.4f}, unbroken {r.unbroken}"
            + (f", late {r.late}" if reference else "")
            + (f"; won: {won}" if won else "")
            + ")"
        )
        if r.note:
            common.say(f"  {r.note}")
    if args.out and distributed.is_main():
        save_json(
            {
                "model": args.model,
                "data": args.data,
                "attack": args.attack,
                "steps": args.steps,
                "budget": args.budget,
                "results": [r.to_dict() for r in results],
            },
            os.path.join(args.out, "ara.json"),
        )
        metrics.plot_ara(results, os.path.join(args.out, "ara.png"))
        common.say(f"wrote {os.path.join(args.out, 'ara.json')} and ara.png")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``pyadvk ara`` and its arguments."""
    p = sub.add_parser(
        "ara",
        help="Accuracy-Robustness Area of a model",
        description="Runs the minimal-perturbation attacks on the first N images and "
        "reports the Accuracy-Robustness Area (Woods et al. 2019). Runs "
        "unchanged under torchrun --nproc_per_node=N (images split over ranks), "
        "except --attack reference.",
    )
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_device_arg(p)
    p.add_argument(
        "--criterion",
        default="both",
        choices=("misclassify", "btr", "both"),
        help="success criterion: misclassified, better than random, or both (default)",
    )
    p.add_argument("--num-images", type=int, default=1000, help="the first N images of the split (default 1000)")
    p.add_argument(
        "--attack",
        default="best",
        choices=("best", "reference", "l2min"),
        help="best: per image the smaller distance of L2Min and FAB (default); reference: the paper's "
        "procedure alone (first N of a seeded permutation of the split); l2min: pyadvk's L2Min alone",
    )
    p.add_argument("--steps", type=int, default=450, help="L2Min steps (default 450)")
    p.add_argument("--budget", type=float, default=20.0, help="sum of the RMS step sizes (default 20)")
    p.add_argument("--out", default=None, metavar="DIR", help="write ara.json and ara.png here")
    p.set_defaults(run=run)
