"""``pyadvk ara``: the Accuracy-Robustness Area of a model on a dataset (JSON + PNG curve)."""

from __future__ import annotations

import os

from pyadvk import distributed, metrics
from pyadvk._io import save_json
from pyadvk.cli import common


def run(args) -> int:
    device = common.device_from(args)
    if args.num_images < 1:
        raise common.UserError(f"--num-images must be >= 1, got {args.num_images}")
    loader, info = common.load_data(args, n=args.num_images)
    model = common.load_model(args, device, info)
    num_classes = common.check_model_on(model, loader, device)
    criteria = ("misclassify", "btr") if args.criterion == "both" else (args.criterion,)
    results = [
        metrics.ara(
            model,
            loader,
            criterion=c,
            n=None,
            num_classes=num_classes,
            steps=args.steps,
            budget=args.budget,
            device=device,
            label=os.path.basename(args.model),
        )
        for c in criteria
    ]
    for r in results:
        common.say(
            f"{r.criterion}-ARA {r.ara:.5f}  (n={r.distances.numel()}, Acc(0) {r.unperturbed_accuracy:.4f}, "
            f"unbroken {r.unbroken})"
        )
    if args.out and distributed.is_main():
        save_json(
            {
                "model": args.model,
                "data": args.data,
                "steps": args.steps,
                "budget": args.budget,
                "results": [r.to_dict() for r in results],
            },
            os.path.join(args.out, "ara.json"),
        )
        metrics.plot_ara(results, os.path.join(args.out, "ara.png"))
        common.say(f"wrote {os.path.join(args.out, 'ara.json')} and ara.png")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ara",
        help="Accuracy-Robustness Area of a model",
        description="Runs the minimal-perturbation attack on the first N images and "
        "reports the Accuracy-Robustness Area (Woods et al. 2019). Runs "
        "unchanged under torchrun --nproc_per_node=N (images split over ranks).",
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
    p.add_argument("--steps", type=int, default=450, help="attack steps (default 450)")
    p.add_argument("--budget", type=float, default=20.0, help="sum of the RMS step sizes (default 20)")
    p.add_argument("--out", default=None, metavar="DIR", help="write ara.json and ara.png here")
    p.set_defaults(run=run)
