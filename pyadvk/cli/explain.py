"""``pyadvk explain``: adversarial explanations of one image, as a PNG grid."""

from __future__ import annotations

import os

import torch

from pyadvk import data as data_mod
from pyadvk import distributed, explain
from pyadvk.cli import common


def run(args) -> int:
    if not distributed.is_main():  # one image: under torchrun, rank 0 does it all
        return 0
    common.check_output_file("--out", args.out)
    device = common.device_from(args)
    model = common.load_model(args, device)
    first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    channels = args.channels or (first.shape[1] if first is not None and first.dim() == 4 else 3)
    size = (args.size, args.size) if args.size else None
    image = data_mod.load_image(args.image, channels=channels, size=size)[None].to(device)
    with torch.no_grad():
        logits = model(image)
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise common.UserError(f"the model must return (B, C) logits, got {tuple(logits.shape)}")
    targets = None if not args.targets else [int(t) for t in args.targets.split(",")]
    e = explain.adversarial_explanation(model, image, targets, rho=args.rho, steps=args.steps, overshoot=args.overshoot)
    names = args.class_names.split(",") if args.class_names else None
    if names is not None and len(names) != logits.shape[1]:
        raise common.UserError(f"--class-names has {len(names)} names, the model {logits.shape[1]} classes")
    explain.save_explanation_grid(args.out, e, names, title=os.path.basename(args.image))
    for t, p in zip(e.targets[0].tolist(), e.target_probabilities[0].tolist()):
        print(f"target {names[t] if names else t}: p = {p:.3f}")
    print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="adversarial explanations of an image",
        description="Walks the image toward each target class within an RMS radius "
        "rho (Woods et al. 2019) and writes the explanations as a PNG grid.",
    )
    common.add_model_args(p)
    common.add_device_arg(p)
    p.add_argument("--image", required=True, metavar="FILE", help="the image (png, jpg, ...)")
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="read the image as grayscale (1) or RGB (3); default: the model's first layer",
    )
    p.add_argument("--size", type=int, default=None, help="resize the image to SIZE×SIZE first")
    p.add_argument("--targets", default=None, help="comma-separated classes (default: every class)")
    p.add_argument("--class-names", default=None, help="comma-separated class names for the labels")
    p.add_argument("--rho", type=float, default=0.1, help="RMS radius of the walk (default 0.1)")
    p.add_argument("--steps", type=int, default=35, help="steps (default 35)")
    p.add_argument("--overshoot", type=float, default=5.0, help="step budget in units of rho (default 5)")
    p.add_argument("--out", default="explanation.png", metavar="PNG", help="output (default explanation.png)")
    p.set_defaults(run=run)
