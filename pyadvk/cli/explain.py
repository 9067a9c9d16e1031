"""``pyadvk explain``: adversarial explanations of one image, as a PNG grid."""

from __future__ import annotations

import argparse
import os

import torch

from pyadvk import data as data_mod
from pyadvk import distributed, explain, models
from pyadvk.cli import common


def model_logits(model: torch.nn.Module, image: torch.Tensor, path: str) -> torch.Tensor:
    """``model(image)`` for a (1, C, H, W) ``image`` read from ``path``, checked to be one row of
    logits; an image the model cannot take raises a UserError naming the shapes it does take and
    the ``--size``/``--channels`` that give them."""
    shape = "×".join(map(str, image.shape[1:]))
    try:
        with torch.no_grad():
            logits = model(image)
    except (RuntimeError, ValueError, IndexError) as exc:
        fits = models.fitting_input_shapes(model, device=image.device)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not fits:
            raise common.UserError(
                f"--image {path!r}: the model does not take a {shape} image ({reason}), nor any square "
                f"1- or 3-channel image of {', '.join(map(str, models.PROBE_SIZES))} pixels"
            ) from exc
        c, h, _ = fits[0]
        options = ", ".join("×".join(map(str, f)) for f in fits)
        raise common.UserError(
            f"--image {path!r}: the model does not take a {shape} image ({reason}); it takes {options}: "
            f"pass --size {h} --channels {c}"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise common.UserError(f"the model must return (1, C) logits for one image, got {got}")
    return logits


def run(args: argparse.Namespace) -> int:
    """Writes the adversarial explanations of --image as a PNG grid (--out); returns 0."""
    if not distributed.is_main():  # one image: under torchrun, rank 0 does it all
        return 0
    common.check_output_file("--out", args.out)
    device = common.device_from(args)
    model = common.load_model(args, device)
    channels = args.channels or models.first_layer_channels(model) or 3
    size = (args.size, args.size) if args.size else None
    image = data_mod.load_image(args.image, channels=channels, size=size)[None].to(device)
    logits = model_logits(model, image, args.image)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``pyadvk explain`` and its arguments."""
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
