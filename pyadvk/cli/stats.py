"""``pyadvk stats``: per-neuron activation statistics of named layers over a dataset (JSON summary,
optional top-patch PNGs), sharded over ranks under torchrun and merged exactly."""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import DataLoader, Subset

from pyadvk import data as data_mod
from pyadvk import distributed, models
from pyadvk.cli import common
from pyadvk.stats import NeuronStats, plot_top_patches, select_channels


def _model(args, device, info):
    if args.model:
        return common.load_model(args, device, info)
    if not args.arch:
        raise common.UserError("name a model: --model FILE (optionally with --arch) or --arch NAME (random weights)")
    torch.manual_seed(args.seed)
    kwargs = common.arch_kwargs(args.arch, info, args.num_classes, args.in_channels)
    return models.build(args.arch, **kwargs).to(device).eval()


def _range(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise common.UserError(f"--histogram-range must be LO,HI (two numbers), got {text!r}") from None
    return lo, hi


def _calibrated_ranges(model, dataset, layers, batch, device) -> dict[str, tuple[float, float]]:
    """Per layer (min, max) of the activations of the dataset's first ``batch`` images, widened by
    a quarter of the span: the same on every rank, so shards' histograms merge."""
    modules = dict(distributed.unwrap(model).named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name in layers
        if name in modules
    ]
    images = next(iter(DataLoader(Subset(dataset, range(min(batch, len(dataset)))), batch_size=batch)))[0]
    try:
        with torch.no_grad():
            model(images.to(device))
    finally:
        for h in hooks:
            h.remove()
    ranges = {}
    for name, out in seen.items():
        out = out[0] if isinstance(out, (tuple, list)) else out
        finite = out.float()[torch.isfinite(out.float())]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        ranges[name] = (lo - span / 4, hi + span / 4)
    return ranges


def _consistency_report(args, model, dataset, total, layers, device) -> dict:
    """Neuron consistency (Dong et al. 2017) of every layer on the images and their PGD-10 L∞
    adversarial images (eps = --consistency), on rank 0 over the whole selection."""
    from pyadvk.attacks import PGD
    from pyadvk.stats import consistency

    eps = args.consistency
    real_loader = DataLoader(Subset(dataset, range(total)), batch_size=args.batch_size)
    attack = PGD(distributed.unwrap(model), eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=False)
    adv_batches = [(attack(x.to(device), y.to(device)).cpu(), y) for x, y in real_loader]
    report = {"eps": eps, "attack": "PGD-10 L-inf, no random start", "layers": {}}
    for name in layers:
        result = consistency(model, name, real_loader, adv_batches, topk=min(args.topk, total))
        report["layers"][name] = result.summary()
        common.say(
            f"{name}: neuron consistency real {report['layers'][name]['consistency_real']:.3f}, "
            f"adversarial {report['layers'][name]['consistency_adv']:.3f}, representation "
            f"{report['layers'][name]['representation_consistency']:.3f}"
        )
    return report


def run(args: argparse.Namespace) -> int:
    common.check_output_dir("--out", args.out, ("stats.json", "stats.pt"))
    device = common.device_from(args)
    if args.consistency is not None and not args.consistency > 0:
        raise common.UserError(f"--consistency must be an L-inf budget > 0, got {args.consistency}")
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    if not layers:
        raise common.UserError("--layers must name at least one layer (comma-separated)")
    if args.num_images is not None and args.num_images < 1:
        raise common.UserError(f"--num-images must be >= 1, got {args.num_images}")
    loader, info = common.load_data(args, n=args.num_images)
    dataset, _ = data_mod.load(args.data, args.split)
    total = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    model = _model(args, device, info)
    common.check_model_on(model, loader, device)
    settings = dict(topk=args.topk, quantile=args.quantile, histogram_bins=args.bins, num_samples=total)
    hist_range = _range(args.histogram_range)
    stats = NeuronStats(model, layers, histogram_range=hist_range, **settings)  # checks the layer names first
    if hist_range is None:
        ranges = _calibrated_ranges(model, dataset, layers, args.batch_size, device)
        stats = NeuronStats(model, layers, histogram_range=ranges, **settings)
    stats.track(loader, device=device, progress=not args.quiet)
    stats.sync()
    for name, r in stats.results().items():
        if r is None:
            continue
        common.say(
            f"{name}: {r['mean'].numel()} channels, {int(r['count'][0])} values each; mean of means "
            f"{float(r['mean'].mean()):.4g}, thresholds (q={args.quantile}) {float(r['threshold'].min()):.4g}"
            f"..{float(r['threshold'].max()):.4g}"
        )
    if args.out and distributed.is_main():
        summary = stats.summary()
        summary.update(
            model=args.model or f"{args.arch} (random weights, seed {args.seed})",
            data=args.data,
            split=args.split,
            world_size=distributed.world_size(),
        )
        from pyadvk._io import save_json

        if args.consistency is not None:
            summary["consistency"] = _consistency_report(args, model, dataset, total, layers, device)
        save_json(summary, os.path.join(args.out, "stats.json"))
        stats.save(os.path.join(args.out, "stats.pt"))
        written = ["stats.json", "stats.pt"]
        if args.patches:
            results = stats.results()
            for name in layers:
                channels = select_channels(results, name, args.patches)
                common.say(f"{name}: patches of channels {channels} (firing, most selective first)")
                written += [
                    os.path.relpath(p, args.out)
                    for p in plot_top_patches(
                        stats,
                        dataset,
                        name,
                        channels,
                        os.path.join(args.out, "patches"),
                        receptive_field=args.receptive_field,
                        model=model,
                    )
                ]
        common.say(f"wrote {', '.join(written[:4])}{' ...' if len(written) > 4 else ''} in {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="per-neuron activation statistics of named layers",
        description="Runs the model over the dataset with NeuronStats on --layers: per channel "
        "count, mean, std, min, max, histogram, top-k activations with their image "
        "index and position, and the exact threshold T with P(a > T) = --quantile. "
        "Writes OUT/stats.json (summary), OUT/stats.pt (state) and, with --patches K, "
        "OUT/patches/<layer>_ch<c>.png for the K channels that fire and are most "
        "selective (top activations farthest above the channel's mean, in stds), each patch "
        "cropped to the activation's receptive field with the field outlined. Runs unchanged under "
        "torchrun --nproc_per_node=N (images split over ranks, merged exactly, rank 0 "
        "writes).",
    )
    common.add_model_args(p, random_weights=True)
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (--arch without --model)")
    common.add_data_args(p, default="digits")
    common.add_device_arg(p)
    p.add_argument("--layers", required=True, help="comma-separated submodule names, e.g. features.3,classifier.2")
    p.add_argument("--num-images", type=int, default=None, help="the first N images of the split (default all)")
    p.add_argument("--topk", type=int, default=16, help="top activations kept per channel (default 16)")
    p.add_argument(
        "--quantile", type=float, default=0.005, help="upper-tail probability of the threshold (default 0.005)"
    )
    p.add_argument("--bins", type=int, default=64, help="histogram bins (default 64)")
    p.add_argument(
        "--histogram-range",
        default=None,
        metavar="LO,HI",
        help="histogram range of every layer (default: per layer, from the first batch's activations)",
    )
    p.add_argument(
        "--patches",
        type=int,
        default=0,
        metavar="K",
        help="write top-patch PNGs of the K most selective channels that fire (dead ones skipped)",
    )
    p.add_argument(
        "--receptive-field",
        type=int,
        default=None,
        metavar="PIXELS",
        help="patch size in pixels (default: the activation's receptive field, from the gradient "
        "of the activation with respect to the image)",
    )
    p.add_argument(
        "--consistency",
        type=float,
        default=None,
        metavar="EPS",
        help="also write the neuron-consistency report of Dong et al. 2017 on the images and "
        "their PGD-10 L-inf adversarial images of budget EPS (real vs adversarial top-K "
        "label consistency, adversarial share of the top-K, representation consistency)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, metavar="DIR", help="write stats.json, stats.pt and patches here")
    p.set_defaults(run=run)
