"""Triton body of channel_stats_update_ (pyadvk/ops/channel_stats.py defines it).

Grid (C, G): program (c, g) reads the g-th range of at most ``VALUES_PER_PROGRAM`` values of
channel c (flattened over samples and spatial positions, through the sample/channel/position
strides, so contiguous, channels_last and (N, C) inputs take the same path) and writes one
partial: NaN count, non-NaN count, float32 sums of ``v - shift`` and ``(v - shift)^2`` (the shift
is the channel's running mean, or the mean of the batch's first sample for a new channel, so a
large common offset cancels), min, max, and its histogram (int32 atomics into its own row). The
partials are merged in float64 with Chan's formula (torch ops on the device). The top-k and the
quantile buffer are then merged with :func:`pyadvk.ops.channel_stats.merge_selection_` (stable
torch sorts / torch.topk on the candidates), exactly as in the reference, so ties break the same
way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

VALUES_PER_PROGRAM = 65536


@triton.jit
def _partials_kernel(
    x_ptr,
    shift_ptr,
    cnt_ptr,
    nan_ptr,
    s1_ptr,
    s2_ptr,
    min_ptr,
    max_ptr,
    hist_ptr,
    S,
    L,
    stride_n,
    stride_c,
    stride_s,
    G,
    per_program,
    lo,
    hi,
    inv,
    bins,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    lo_f = tl.cast(lo, tl.float32)
    hi_f = tl.cast(hi, tl.float32)
    inv_f = tl.cast(inv, tl.float32)
    nbins = tl.cast(bins, tl.int64)
    shift = tl.load(shift_ptr + c)
    start = g * per_program
    end = tl.minimum(start + per_program, L)
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    nan = tl.zeros([BLOCK], tl.int32)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    row = (c * G + g) * (nbins + 2)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK).to(tl.int64)
        inb = i < end
        n = i // S
        p = i - n * S
        v = tl.load(x_ptr + n * stride_n + c * stride_c + p * stride_s, mask=inb, other=0.0).to(tl.float32)
        isnan = v != v
        ok = inb & (~isnan)
        d = tl.where(ok, v - shift, 0.0)
        s1 += d
        s2 += d * d
        cnt += ok.to(tl.int32)
        nan += (inb & isnan).to(tl.int32)
        mn = tl.where(ok & (v < mn), v, mn)
        mx = tl.where(ok & (v > mx), v, mx)
        inside = (v >= lo_f) & (v <= hi_f)
        b = tl.floor((tl.where(inside, v, lo_f) - lo_f) * inv_f).to(tl.int64)
        b = tl.minimum(b, nbins - 1) + 1
        col = tl.where(inside, b, tl.where(v < lo_f, 0, nbins + 1))
        tl.atomic_add(hist_ptr + row + col, tl.full([BLOCK], 1, tl.int32), mask=ok)
    out = c * G + g
    tl.store(cnt_ptr + out, tl.sum(cnt, axis=0))
    tl.store(nan_ptr + out, tl.sum(nan, axis=0))
    tl.store(s1_ptr + out, tl.sum(s1, axis=0))
    tl.store(s2_ptr + out, tl.sum(s2, axis=0))
    tl.store(min_ptr + out, tl.min(mn, axis=0))
    tl.store(max_ptr + out, tl.max(mx, axis=0))


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(S, stride_n, stride_c, stride_s) of a dense x, positions in row-major spatial order."""
    c = x.shape[1]
    s = x[0, 0].numel()
    if x.dim() > 2 and not x.is_contiguous():  # channels_last(_3d)
        return s, s * c, 1, c
    return s, c * s, s, 1


@triton_op(
    "pyadvk::channel_stats_update_triton_",
    mutates_args={
        "count",
        "nan_count",
        "mean",
        "m2",
        "minimum",
        "maximum",
        "hist",
        "topk_values",
        "topk_sample",
        "topk_pos",
        "qbuf",
    },
)
def channel_stats_update_triton_(
    count: torch.Tensor,
    nan_count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    minimum: torch.Tensor,
    maximum: torch.Tensor,
    hist: torch.Tensor,
    topk_values: torch.Tensor,
    topk_sample: torch.Tensor,
    topk_pos: torch.Tensor,
    qbuf: torch.Tensor,
    x: torch.Tensor,
    sample_offset: int,
    lo: float,
    hi: float,
) -> None:
    from pyadvk.ops import channel_stats as cs

    N, C = x.shape[0], x.shape[1]
    if N == 0:
        return
    S, sn, sc, ss = _strides(x)
    L = N * S
    bins = hist.shape[1] - 2
    G = triton.cdiv(L, VALUES_PER_PROGRAM)
    per = triton.cdiv(L, G)
    first = x[0].float().reshape(C, -1)
    first_mean = torch.nan_to_num(torch.nanmean(first, dim=1), nan=0.0)
    shift = torch.where(count > 0, mean.float(), first_mean).contiguous()
    dev = x.device
    cnt = torch.empty(C * G, dtype=torch.int32, device=dev)
    nan = torch.empty(C * G, dtype=torch.int32, device=dev)
    s1 = torch.empty(C * G, dtype=torch.float32, device=dev)
    s2 = torch.empty(C * G, dtype=torch.float32, device=dev)
    pmin = torch.empty(C * G, dtype=torch.float32, device=dev)
    pmax = torch.empty(C * G, dtype=torch.float32, device=dev)
    phist = torch.zeros(C * G, bins + 2, dtype=torch.int32, device=dev)
    block = max(16, min(1024, triton.next_power_of_2(per)))
    wrap_triton(_partials_kernel)[(C, G)](
        x,
        shift,
        cnt,
        nan,
        s1,
        s2,
        pmin,
        pmax,
        phist,
        S,
        L,
        sn,
        sc,
        ss,
        G,
        per,
        lo,
        hi,
        bins / (hi - lo),
        bins,
        BLOCK=block,
    )
    # Merge the partials: each is (n, mean = shift + s1/n, M2 = s2 - s1^2/n), in float64.
    n = cnt.view(C, G).to(torch.int64)
    nd = n.double().clamp(min=1)
    d1 = s1.view(C, G).double()
    pmean = shift.double()[:, None] + d1 / nd
    pm2 = (s2.view(C, G).double() - d1 * d1 / nd).clamp(min=0)
    old_count = count.clone()
    tn, tmean, tm2 = count.clone(), mean.clone(), m2.clone()
    for g in range(G):
        tn, tmean, tm2 = cs.chan_merge(tn, tmean, tm2, n[:, g], pmean[:, g], pm2[:, g])
    minimum.copy_(torch.minimum(minimum, pmin.view(C, G).amin(1)))
    maximum.copy_(torch.maximum(maximum, pmax.view(C, G).amax(1)))
    nan_count.add_(nan.view(C, G).sum(1).to(torch.int64))
    hist.add_(phist.view(C, G, bins + 2).sum(1).to(torch.int64))
    v = cs.channel_view(x)
    valid = ~torch.isnan(v)
    keys = (sample_offset * S + torch.arange(L, device=dev)).expand(C, -1)
    state = cs.ChannelStats(
        count,
        nan_count,
        mean,
        m2,
        minimum,
        maximum,
        hist,
        topk_values,
        topk_sample,
        topk_pos,
        qbuf,
        lo=lo,
        hi=hi,
        spatial_size=S,
    )
    cs.merge_selection_(state, old_count, v, keys, valid)
    count.copy_(tn)
    mean.copy_(tmean)
    m2.copy_(tm2)
