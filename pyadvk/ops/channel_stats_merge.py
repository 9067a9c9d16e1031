"""The merge algebra of per-channel statistics (:mod:`pyadvk.ops.channel_stats`): histogram
columns, Chan's parallel moments, top-k and quantile-buffer merges shared by the torch body, the
Triton wrapper and :func:`merge_states`; and the merging of two states, with the re-binning of
histograms of different ranges (:func:`rebin`, :func:`merged_range`, :func:`dyadic_range`)."""

from __future__ import annotations

import math

import torch

from pyadvk.ops.channel_stats_state import ChannelStats

# ---------------------------------------------------------------------------------------------
# Pieces shared by the torch reference, the Triton wrapper and merging of states.


def bin_columns(values: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Histogram column (0 = under, 1..bins, bins+1 = over) of each float32 value (no NaN).

    ``lo``, ``hi`` and ``inv = bins / (hi - lo)`` enter as Python scalars, which a float32 op
    rounds to float32 (as every body does) without a host-to-device copy."""
    lo32, hi32, inv = _f32(lo), _f32(hi), _f32(bins / (hi - lo))
    inside = (values >= lo32) & (values <= hi32)
    b = torch.floor((torch.where(inside, values, lo32) - lo32) * inv).clamp_(max=bins - 1).to(torch.int64) + 1
    return torch.where(inside, b, torch.where(values < lo32, 0, bins + 1))


def _f32(v: float) -> float:
    """``v`` rounded to float32 (a Python float that a float32 op uses unchanged; ±inf past the
    float32 range, as C++'s cast gives)."""
    return torch.tensor(v, dtype=torch.float32).item()


def infinite_moments_(mean: torch.Tensor, m2: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor) -> None:
    """Sets the moments of channels that have seen ±inf, in place: mean +inf, -inf or NaN (both
    signs seen), m2 NaN. Every body applies it after merging, so the result does not depend on
    the order in which partial moments met the infinity (where Chan's formula gives inf - inf)."""
    pos, neg = maximum == math.inf, minimum == -math.inf
    mean.copy_(torch.where(pos & neg, math.nan, torch.where(pos, math.inf, torch.where(neg, -math.inf, mean))))
    m2.copy_(torch.where(pos | neg, math.nan, m2))


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel combination of (count, mean, M2) triples (float64; counts int64)."""
    na, nb = n_a.to(torch.float64), n_b.to(torch.float64)
    n = na + nb
    safe = torch.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = torch.where(nb > 0, torch.where(na > 0, mean_a + delta * (nb / safe), mean_b), mean_a)
    m2 = torch.where(
        (na > 0) & (nb > 0), m2_a + m2_b + delta * delta * (na * nb / safe), torch.where(na > 0, m2_a, m2_b)
    )
    return n_a + n_b, mean, m2


def merge_topk(values: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int):
    """Per row, the ``k`` best valid entries: larger value first, then smaller key; invalid entries
    last. Returns (values, keys) of shape (rows, k) (padding: -inf, -1)."""
    order = torch.sort(keys, dim=1, stable=True).indices
    v, kk, ok = values.gather(1, order), keys.gather(1, order), valid.gather(1, order)
    order = torch.sort(torch.where(ok, v, -math.inf), dim=1, descending=True, stable=True).indices
    v, kk, ok = v.gather(1, order), kk.gather(1, order), ok.gather(1, order)
    order = torch.sort(ok.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    v, kk, ok = v.gather(1, order), kk.gather(1, order), ok.gather(1, order)
    if v.shape[1] < k:
        pad = k - v.shape[1]
        v = torch.cat([v, v.new_full((v.shape[0], pad), -math.inf)], 1)
        kk = torch.cat([kk, kk.new_full((kk.shape[0], pad), -1)], 1)
        ok = torch.cat([ok, ok.new_zeros((ok.shape[0], pad))], 1)
    return torch.where(ok, v, -math.inf), torch.where(ok, kk, -1)


def merge_buffers(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` largest values per row of two descending buffers (padding -inf)."""
    if m == 0:
        return a[:, :0]
    both = torch.cat([a, b], 1)
    if both.shape[1] < m:
        both = torch.cat([both, both.new_full((both.shape[0], m - both.shape[1]), -math.inf)], 1)
    return torch.topk(both, m, dim=1).values


def _slots(count: torch.Tensor, width: int) -> torch.Tensor:
    """(C, width) mask of the filled slots of a buffer: the first min(count, width)."""
    return torch.arange(width, device=count.device) < count.clamp(max=width)[:, None]


def merge_partials(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    shift: torch.Tensor,
    n: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state's (count, mean, M2) (C,) combined with G partials per channel in one pass (no
    loop over the partials): partial (c, g) holds ``n[c, g]`` values with the sums
    ``s1 = Σ (v - shift[c])`` and ``s2 = Σ (v - shift[c])²`` (any float dtype; merged in float64).
    With ``N = count + Σ_g n``: ``mean' = shift + (count (mean - shift) + Σ_g s1) / N`` and
    ``M2' = M2 + Σ_g (s2 - s1²/n) + count (mean - mean')² + Σ_g n (shift + s1/n - mean')²``
    (the parallel-variance formula for many parts; deviations from the shift keep a large common
    offset from cancelling). Channels without values keep their state."""
    nd = n.double()
    safe = nd.clamp(min=1)
    d1 = s1.double()
    part_m2 = (s2.double() - d1 * d1 / safe).clamp(min=0)
    shift = shift.double()
    total = count + n.sum(1)
    had = count > 0
    old_off = torch.where(had, mean - shift, 0.0)
    new_mean = shift + (count.double() * old_off + d1.sum(1)) / total.double().clamp(min=1)
    spread = torch.where(had, count.double() * (mean - new_mean) ** 2, 0.0)
    spread = spread + torch.where(n > 0, nd * (shift[:, None] + d1 / safe - new_mean[:, None]) ** 2, 0.0).sum(1)
    new_m2 = m2 + part_m2.sum(1) + spread
    seen = total > 0
    return total, torch.where(seen, new_mean, mean), torch.where(seen, new_m2, m2)


def preselect_topk(values: torch.Tensor, valid: torch.Tensor, key0: int, k: int):
    """The ``k`` best valid entries of each row of a batch (C, L), ranked as :func:`merge_topk`
    ranks them (larger value, then smaller key ``key0 + column``), by one ``torch.topk`` over an
    int64 composite key (the float's order-preserving bits, then the inverted column) instead of
    sorting the batch. Returns (values, keys, valid) of shape (C, min(k, L)); with fewer than k
    valid entries the rest are invalid. Rows must be shorter than 2**32."""
    length = values.shape[1]
    columns = torch.arange(length, device=values.device)
    if length <= k:
        return values, (key0 + columns).expand_as(values), valid
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ranks as 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    composite = torch.where(valid, (ordered << 32) | (0xFFFFFFFF - columns), torch.iinfo(torch.int64).min)
    top = torch.topk(composite, k, dim=1).indices
    return values.gather(1, top), key0 + top, valid.gather(1, top)


def merge_selection_(
    state: ChannelStats,
    old_count: torch.Tensor,
    values: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    buffer_candidates: torch.Tensor | None = None,
) -> None:
    """Folds candidate (values, keys, valid) of shape (C, L) into the state's top-k and quantile
    buffer, in place; ``old_count`` is the non-NaN count before these candidates. The buffer
    takes the largest valid ``values``, or ``buffer_candidates`` (C, <= M) when given (the
    batch's largest values, when ``values`` was preselected for the top-k only)."""
    spatial = state.spatial_size
    k = state.topk
    slot = _slots(old_count, k)
    old_keys = torch.where(slot, state.topk_sample * spatial + state.topk_pos, -1)
    v, kk = merge_topk(
        torch.cat([state.topk_values, values], 1), torch.cat([old_keys, keys], 1), torch.cat([slot, valid], 1), k
    )
    state.topk_values.copy_(v)
    state.topk_sample.copy_(torch.where(kk >= 0, kk // spatial, -1))
    state.topk_pos.copy_(torch.where(kk >= 0, kk % spatial, -1))
    if state.quantile_capacity:
        cand = buffer_candidates
        if cand is None:
            cand = torch.where(valid, values, -math.inf)
            width = min(state.quantile_capacity, cand.shape[1])
            cand = torch.topk(cand, width, dim=1).values if width < cand.shape[1] else cand
        state.qbuf.copy_(merge_buffers(state.qbuf, cand, state.quantile_capacity))


def channel_view(x: torch.Tensor) -> torch.Tensor:
    """(C, N*S) float32 view/copy of activations (N, C, *spatial), column n*S + p."""
    n, c = x.shape[0], x.shape[1]
    return x.float().reshape(n, c, -1).transpose(0, 1).reshape(c, -1)


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
    slots = torch.cat([_slots(a.count, a.topk), _slots(b.count, b.topk)], 1)
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
