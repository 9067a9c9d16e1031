"""The merging of two states of per-channel statistics (:mod:`pyadvk.ops.channel_stats`):
:func:`merge_states`, with the re-binning of histograms of different ranges (:func:`rebin`,
:func:`merged_range`, :func:`dyadic_range`). The merge algebra it shares with the op's bodies
(Chan's moments, top-k and quantile-buffer merges) is in pyadvk/_channel_merge.py."""

from __future__ import annotations

import math

import torch

from pyadvk._channel_merge import chan_merge, filled_slots, infinite_moments_, merge_buffers, merge_topk
from pyadvk.ops.channel_stats_state import ChannelStats


def merge_states(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """A new state equal to one pass over the data of ``a`` and of ``b`` (in either order: the
    top-k tie order depends on the sample indices only).

    Exact for the counts, moments, min/max, top-k and quantile buffer. The histogram is exact
    when both states have the same range; otherwise both are re-binned (:func:`rebin`) onto
    :func:`merged_range` with the same number of bins, and ``hist_moved`` bounds, per channel,
    the values whose column may differ from the one-pass histogram on that grid (0 when both
    grids are dyadic, see :func:`dyadic_range`, and nothing lay outside them)."""
    a.check_compatible(b, "the other state", same_range=False)
    lo, hi = merged_range(a, b)
    out = a.clone()
    out.lo, out.hi = lo, hi
    out.spatial_size = a.spatial_size or b.spatial_size
    out.samples = a.samples + b.samples
    spatial = out.spatial_size or 1
    out.nan_count += b.nan_count
    torch.minimum(a.minimum, b.minimum, out=out.minimum)
    torch.maximum(a.maximum, b.maximum, out=out.maximum)
    (hist_a, moved_a), (hist_b, moved_b) = rebin(a, lo, hi), rebin(b, lo, hi)
    out.hist.copy_(hist_a + hist_b)
    out.hist_moved = moved_a + moved_b
    slots = torch.cat([filled_slots(a.count, a.topk), filled_slots(b.count, b.topk)], 1)
    keys = torch.cat([a.topk_sample * spatial + a.topk_pos, b.topk_sample * spatial + b.topk_pos], 1)
    v, kk = merge_topk(torch.cat([a.topk_values, b.topk_values], 1), torch.where(slots, keys, -1), slots, a.topk)
    out.topk_values.copy_(v)
    out.topk_sample.copy_(torch.where(kk >= 0, kk // spatial, -1))
    out.topk_pos.copy_(torch.where(kk >= 0, kk % spatial, -1))
    out.qbuf.copy_(merge_buffers(a.qbuf, b.qbuf, a.quantile_capacity))
    n, mean, m2 = chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2)
    out.count.copy_(n)
    out.mean.copy_(mean)
    out.m2.copy_(m2)
    infinite_moments_(out.mean, out.m2, out.minimum, out.maximum)
    return out


# Dyadic grids: bin width a power of two and lo a multiple of it, lo / width below 2**22 in size
# (so lo, hi and the width are exact in float32). Two such grids nest in the coarser one.
_DYADIC_LIMIT = 2**22


def dyadic_range(lo: float, hi: float, bins: int) -> tuple[float, float]:
    """The dyadic grid of ``bins`` bins that covers [lo, hi] with the finest width: width
    ``w = 2**e``, ``lo' = floor(lo / w) * w``, ``hi' = lo' + bins * w``. The bins of two dyadic
    grids with the same number of bins nest in those of the coarser grid that covers both, so
    histograms on them merge without moving any value across an edge (:func:`merged_range`).
    Returns (lo, hi) unchanged when no dyadic grid represents it exactly in float32 (data far
    from 0 relative to its spread)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"the histogram range must be finite with lo < hi, got lo={lo}, hi={hi}")
    width = 2.0 ** math.ceil(math.log2((hi - lo) / bins))
    return _dyadic_cover(lo, hi, bins, width) or (lo, hi)


def _dyadic_cover(lo: float, hi: float, bins: int, width: float) -> tuple[float, float] | None:
    """The dyadic grid of width >= ``width`` (doubling) that covers [lo, hi], or None."""
    while math.isfinite(width):
        start = math.floor(lo / width)
        if abs(start) + bins >= _DYADIC_LIMIT:
            return None
        if (start + bins) * width >= hi:
            return start * width, (start + bins) * width
        width *= 2
    return None


def _dyadic_width(lo: float, hi: float, bins: int) -> float | None:
    """The bin width of a dyadic grid, or None when (lo, hi, bins) is not one."""
    width = (hi - lo) / bins
    if width <= 0 or math.frexp(width)[0] != 0.5 or lo / width != math.floor(lo / width):
        return None
    return width if abs(lo / width) + bins < _DYADIC_LIMIT else None


def merged_range(a: ChannelStats, b: ChannelStats) -> tuple[float, float]:
    """The histogram range of merged states: their common range; for two dyadic grids
    (:func:`dyadic_range`) the finest dyadic grid that covers both, in which both nest; else the
    union ``[min(lo), max(hi)]``."""
    if (a.lo, a.hi) == (b.lo, b.hi):
        return a.lo, a.hi
    lo, hi = min(a.lo, b.lo), max(a.hi, b.hi)
    wa, wb = _dyadic_width(a.lo, a.hi, a.bins), _dyadic_width(b.lo, b.hi, b.bins)
    if wa is not None and wb is not None:
        cover = _dyadic_cover(lo, hi, a.bins, max(wa, wb))
        if cover is not None:
            return cover
    return lo, hi


def rebin(state: ChannelStats, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The state's histogram moved onto ``bins`` columns over [lo, hi] (with under/overflow
    columns), and the new bound on the values whose column may be wrong.

    A source column holds values in an interval: its bin ``[e_j, e_j+1)`` (the last bin closed),
    or ``[minimum, lo)`` / ``(hi, maximum]`` for the under/overflow columns, narrowed to the
    channel's [minimum, maximum]. When the whole interval falls in one target column, its values
    go there; otherwise its count goes to the target column of the interval's midpoint and is
    added to the bound. Each channel's bound is ``state.hist_moved`` plus the counts so placed (at
    most the count): the histogram differs from one built on the new grid by at most that many
    values (half the L1 distance of the two histograms is at most the bound). Edges are compared
    in exact arithmetic (float64): a value within float32 rounding of an edge (relative
    ``2**-24`` of the range), which the column formula may put on either side, is not counted.
    Re-binning onto the same range is the identity; a dyadic grid onto a coarser dyadic grid
    that covers the channel's [minimum, maximum] moves nothing."""
    assert state.hist_moved is not None  # ChannelStats.__post_init__ sets it
    if (lo, hi) == (state.lo, state.hi):
        return state.hist.clone(), state.hist_moved.clone()
    bins, dev = state.bins, state.hist.device
    width_t = (hi - lo) / bins

    def at(x: torch.Tensor) -> torch.Tensor:  # target column of the point x
        inner = 1 + torch.floor((x - lo) / width_t).clamp(0, bins - 1)
        return torch.where(x < lo, 0, torch.where(x > hi, bins + 1, inner)).long()

    def below(x: torch.Tensor) -> torch.Tensor:  # target column of the values just below x
        inner = torch.ceil((x - lo) / width_t).clamp(1, bins)
        return torch.where(x <= lo, 0, torch.where(x > hi, bins + 1, inner)).long()

    def above(x: torch.Tensor) -> torch.Tensor:  # target column of the values just above x
        inner = 1 + torch.floor((x - lo) / width_t).clamp(0, bins - 1)
        return torch.where(x < lo, 0, torch.where(x >= hi, bins + 1, inner)).long()

    j = torch.arange(bins + 2, dtype=torch.float64, device=dev)
    width = (state.hi - state.lo) / bins
    edge_lo = torch.where(j == 0, -math.inf, torch.where(j == bins + 1, state.hi, state.lo + (j - 1) * width))
    edge_hi = torch.where(j == 0, state.lo, torch.where(j == bins + 1, math.inf, state.lo + j * width))
    edge_hi = torch.where(j == bins, state.hi, edge_hi)
    mn, mx = state.minimum.double()[:, None], state.maximum.double()[:, None]
    # first column: values >= edge_lo (> hi for the overflow column); narrowed to >= minimum
    first = torch.where(
        (mn > edge_lo) | ((j == 0) & (mn >= edge_lo)), at(mn), torch.where(j == bins + 1, above(edge_lo), at(edge_lo))
    )
    # last column: values < edge_hi (<= hi for the last bin); narrowed to <= maximum
    closed = (j == bins) | (j == bins + 1)
    last = torch.where(
        (mx < edge_hi) | (closed & (mx <= edge_hi)), at(mx), torch.where(closed, at(edge_hi), below(edge_hi))
    )
    certain = first == last
    middle = (torch.maximum(edge_lo, mn) + torch.minimum(edge_hi, mx)) / 2
    target = torch.where(certain, first, at(middle.nan_to_num()))
    hist = torch.zeros_like(state.hist).scatter_add_(1, target, state.hist)
    moved = (state.hist_moved + torch.where(certain, 0, state.hist).sum(1)).minimum(state.count)
    return hist, moved
