"""The merge algebra of per-channel statistics (:mod:`pyadvk.ops.channel_stats` documents the op
and its state): histogram columns, Chan's parallel moments, the merge of per-group partials, top-k
and quantile-buffer merges. Shared by the op's torch body, its Triton body (kernels/
channel_stats.py) and the merging of two states (pyadvk/ops/channel_stats_merge.py); a leaf, so the
Triton body does not import the ops package. Every function works on the state's tensors, not on a
:class:`~pyadvk.ops.ChannelStats`."""

from __future__ import annotations

import math

import torch


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


def filled_slots(count: torch.Tensor, width: int) -> torch.Tensor:
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
    topk_values: torch.Tensor,
    topk_sample: torch.Tensor,
    topk_pos: torch.Tensor,
    qbuf: torch.Tensor,
    old_count: torch.Tensor,
    values: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    *,
    spatial_size: int,
    buffer_candidates: torch.Tensor | None = None,
) -> None:
    """Folds candidate (values, keys, valid) of shape (C, L) into a state's top-k
    (``topk_values``, ``topk_sample``, ``topk_pos``, (C, K)) and quantile buffer ``qbuf`` (C, M),
    in place; ``old_count`` is the non-NaN count before these candidates, a key is
    ``sample * spatial_size + position``. The buffer takes the largest valid ``values``, or
    ``buffer_candidates`` (C, <= M) when given (the batch's largest values, when ``values`` was
    preselected for the top-k only)."""
    k = topk_values.shape[1]
    slot = filled_slots(old_count, k)
    old_keys = torch.where(slot, topk_sample * spatial_size + topk_pos, -1)
    v, kk = merge_topk(
        torch.cat([topk_values, values], 1), torch.cat([old_keys, keys], 1), torch.cat([slot, valid], 1), k
    )
    topk_values.copy_(v)
    topk_sample.copy_(torch.where(kk >= 0, kk // spatial_size, -1))
    topk_pos.copy_(torch.where(kk >= 0, kk % spatial_size, -1))
    capacity = qbuf.shape[1]
    if capacity:
        cand = buffer_candidates
        if cand is None:
            cand = torch.where(valid, values, -math.inf)
            width = min(capacity, cand.shape[1])
            cand = torch.topk(cand, width, dim=1).values if width < cand.shape[1] else cand
        qbuf.copy_(merge_buffers(qbuf, cand, capacity))


def channel_view(x: torch.Tensor) -> torch.Tensor:
    """(C, N*S) float32 view/copy of activations (N, C, *spatial), column n*S + p."""
    n, c = x.shape[0], x.shape[1]
    return x.float().reshape(n, c, -1).transpose(0, 1).reshape(c, -1)
