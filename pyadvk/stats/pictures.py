"""Pictures of :class:`pyadvk.stats.NeuronStats` results: which channels to look at
(:func:`select_channels`), where a unit looks in the image (:func:`receptive_field_box`), and the
top-activating patches per channel (:func:`plot_top_patches`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyadvk import _checks, distributed
from pyadvk._io import save_figure
from pyadvk.stats.neuron_stats import NeuronStats


def _layer_results(stats: NeuronStats | dict[str, Any], layer: str) -> dict[str, Any]:
    """``layer``'s entry of ``stats.results()`` (or of a results dict); ValueError when it has none."""
    results = stats.results() if isinstance(stats, NeuronStats) else stats
    r = results.get(layer)
    if r is None:
        raise ValueError(f"layer {layer!r} has no statistics; layers: {', '.join(n for n, v in results.items() if v)}")
    return r


def select_channels(stats: NeuronStats | dict[str, Any], layer: str, k: int) -> list[int]:
    """The ``k`` channels of ``layer`` to look at first: those that fire, most selective first.

    A channel fires when its largest activation is > 0 and its values vary (std > 0): dead
    channels (a ReLU that never opens, a constant output) are left out, so fewer than ``k`` may
    come back. Selectivity is how far the channel's top activations stand out of its usual values:
    ``(mean of its top-k values - mean) / std``, the z-score of its strongest responses (a channel
    that responds strongly to a few images ranks above one that is always on). Ties go to the
    smaller channel index."""
    r = _layer_results(stats, layer)
    k = _checks.integer("k", k, low=1)
    top = r["topk_values"].double()
    filled = r["topk_indices"] >= 0
    top_mean = torch.where(filled, top, 0.0).sum(1) / filled.sum(1).clamp(min=1)
    std = r["std"].double()
    fires = (r["max"] > 0) & (std > 0) & torch.isfinite(std) & filled[:, 0]
    score = torch.where(fires, (top_mean - r["mean"].double()) / torch.where(fires, std, 1.0), -math.inf)
    order = sorted(range(score.numel()), key=lambda c: (-float(score[c]), c))
    return [c for c in order if bool(fires[c])][:k]


def receptive_field_box(
    model: nn.Module, layer: str, image: torch.Tensor, channel: int, coords: Sequence[int]
) -> tuple[int, int, int, int] | None:
    """The input pixels that the activation ``layer[channel, *coords]`` of ``image`` (C, H, W)
    depends on, as a box (top, left, bottom, right), bottom/right exclusive: the support of the
    gradient of that activation with respect to the image (its effective receptive field on this
    image, which the layer path bounds from above). None when the gradient is zero everywhere
    (e.g. a saturated unit) or the layer has no spatial grid."""
    module = dict(distributed.unwrap(model).named_modules())[layer]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, (tuple, list)) else o))
    x = image[None].detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(x)
            out = captured[0]
            if out.dim() < 3 or len(coords) != out.dim() - 2:
                return None
            index = (0, channel, *coords)
            (grad,) = torch.autograd.grad(out[index], x)
    finally:
        handle.remove()
        model.train(was_training)
    support = grad[0].abs().sum(0) > 0
    if support.dim() != 2 or not bool(support.any()):
        return None
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def plot_top_patches(
    stats: NeuronStats | dict[str, Any],
    dataset: Any,
    layer: str,
    channels: Sequence[int],
    path: str | os.PathLike,
    *,
    receptive_field: int | None = None,
    k: int | None = None,
    model: nn.Module | None = None,
) -> list[str]:
    """For each channel of ``channels`` in ``layer``, writes ``path/<layer>_ch<c>.png``: a grid of
    the image patches of its top-k activations (best first), titled with value and dataset index.

    ``dataset[i][0]`` (or ``dataset[i]``) must be the (C, H, W) image in [0, 1] of dataset index i.
    With ``model`` (and no ``receptive_field``), a patch is the activation's receptive field on
    that image (:func:`receptive_field_box`) with a margin of a quarter of its size for context,
    the field outlined in red. With ``receptive_field``, it is the ``receptive_field`` squared
    pixels centred on the image point under the activation's spatial position (the layer's grid
    stretched over the image), outlined the same way. Otherwise the whole image. Choose the
    channels with :func:`select_channels`. Returns the paths written (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    r = _layer_results(stats, layer)
    n_channels = r["topk_values"].shape[0]
    if receptive_field is not None:
        receptive_field = _checks.integer("receptive_field", receptive_field, low=1)
    paths = []
    for c in channels:
        if not isinstance(c, int) or not 0 <= c < n_channels:
            raise ValueError(f"channels: {c!r} is not a channel of layer {layer!r} (0..{n_channels - 1})")
    for c in channels:
        idx = r["topk_indices"][c].tolist()
        vals = r["topk_values"][c].tolist()
        coords = r["topk_coords"][c].tolist()
        entries = [(i, v, co) for i, v, co in zip(idx, vals, coords) if i >= 0][: k or len(idx)]
        cols = max(1, min(8, len(entries)))
        rows = max(1, math.ceil(len(entries) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (i, v, co) in zip(axes.flat, entries):
            item = dataset[i]
            img = item[0] if isinstance(item, (tuple, list)) else item
            img = img.detach().float().cpu()
            img = img[None] if img.dim() == 2 else img
            box = None
            if receptive_field is not None:
                box = _square_box(img, co, r["spatial_shape"], receptive_field)
            elif model is not None:
                device = next(iter(model.parameters()), img).device
                box = receptive_field_box(model, layer, img.to(device), c, co)
            patch, field = _crop(img, box)
            if patch.shape[0] == 1:
                ax.imshow(patch[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(patch[:3].permute(1, 2, 0).clamp(0, 1).numpy())
            if field is not None:
                top, left, bottom, right = field
                ax.add_patch(
                    Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, ec="red", lw=1.2)
                )
            ax.set_title(f"{v:.3g} #{i}", fontsize=7)
        fig.suptitle(f"{layer} channel {c}: top {len(entries)}", fontsize=8)
        out = os.path.join(os.fspath(path), f"{layer.replace('.', '_')}_ch{c}.png")
        save_figure(fig, out, dpi=100)
        paths.append(out)
    return paths


def _square_box(
    img: torch.Tensor, coords: list[int], spatial: tuple[int, ...], size: int
) -> tuple[int, int, int, int] | None:
    """The ``size``-pixel square centred on the image point under a position of the layer's grid
    (the grid stretched over the image), clipped to the image; None without a 2-d grid."""
    if len(spatial) != 2:
        return None
    h, w = img.shape[-2:]
    cy = int((coords[0] + 0.5) * h / spatial[0])
    cx = int((coords[1] + 0.5) * w / spatial[1])
    half = size // 2
    return max(0, cy - half), max(0, cx - half), min(h, cy - half + size), min(w, cx - half + size)


def _crop(
    img: torch.Tensor, box: tuple[int, int, int, int] | None
) -> tuple[torch.Tensor, tuple[int, int, int, int] | None]:
    """The box with a margin of a quarter of its size (clipped to the image), and the box in the
    crop's coordinates; the whole image and None without a box."""
    if box is None:
        return img, None
    h, w = img.shape[-2:]
    top, left, bottom, right = box
    my, mx = max(1, (bottom - top) // 4), max(1, (right - left) // 4)
    y0, x0, y1, x1 = max(0, top - my), max(0, left - mx), min(h, bottom + my), min(w, right + mx)
    return img[:, y0:y1, x0:x1], (top - y0, left - x0, bottom - y0, right - x0)
