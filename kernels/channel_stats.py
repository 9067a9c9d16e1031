"""Triton body of channel_stats_update_ (pyadvk/ops/channel_stats.py defines it).

Programs write per (channel, sample-group) partials: NaN count, non-NaN count, float64 sums of
``v - shift`` and ``(v - shift)^2`` (float32 squares overflow once values spread past ~1.8e19;
the shift is the channel's running mean, or the mean of the batch's first sample for a new
channel, so a large common offset cancels), min, max, and a histogram row. Two kernels read along
the contiguous dimension, with no division per value:

* ``_runs_kernel`` (contiguous (N, C, *spatial)): program (c, g) reads its samples' runs of S
  positions of channel c as tiles of [samples, positions];
* ``_rows_kernel`` (channels innermost: channels_last and (N, C)): program (b, g) reads tiles of
  [rows, CB channels], a row being the C values of one (sample, position), so neighbouring lanes
  read neighbouring channels.

Each program counts its histogram in registers with ``tl.histogram`` and writes it once (no
atomic per value); when the columns of a tile's channels do not fit in registers
(``HIST_REGISTERS``) it falls back to atomics into its own row. The partials are merged in one
pass on the device (:func:`pyadvk._channel_merge.merge_partials`: a handful of torch ops,
whatever the number of groups). The top-k candidates of the batch are selected with one
``torch.topk`` over composite keys (:func:`~pyadvk._channel_merge.preselect_topk`), the
quantile buffer's with one ``torch.topk``, and both merged into the state with the reference's tie
order (:func:`~pyadvk._channel_merge.merge_selection_`). Channels that saw ±inf get the
moments of :func:`~pyadvk._channel_merge.infinite_moments_`. Everything runs on the
activations' device (``on_device_of``). The merge algebra is the leaf pyadvk/_channel_merge.py,
which the torch body uses too (this module does not import the ops package).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pyadvk._channel_merge import channel_view, infinite_moments_, merge_partials, merge_selection_, preselect_topk
from pyadvk.kernels import _common

VALUES_PER_PROGRAM = 65536
BLOCK = 1024
HIST_REGISTERS = 4096  # histogram columns a program may count in registers
ROW_CHANNELS = 32  # channels per program of the channels-innermost kernel


@triton.jit
def _column(v, ok, lo_f, hi_f, inv_f, nbins):
    """The histogram column of each value (0 under, bins + 1 over), as every body computes it."""
    inside = (v >= lo_f) & (v <= hi_f)
    b = tl.floor((tl.where(inside, v, lo_f) - lo_f) * inv_f).to(tl.int32)
    b = tl.minimum(b, nbins - 1) + 1
    col = tl.where(inside, b, tl.where(v < lo_f, 0, nbins + 1))
    return tl.where(ok, col, 0)


@triton.jit
def _runs_kernel(
    x_ptr,
    shift_ptr,
    cnt_ptr,
    nan_ptr,
    s1_ptr,
    s2_ptr,
    min_ptr,
    max_ptr,
    hist_ptr,
    N,
    S,
    stride_n,
    stride_c,
    G,
    samples_per_program,
    lo,
    hi,
    inv,
    bins,
    NB: tl.constexpr,
    SB: tl.constexpr,
    HB: tl.constexpr,
    REGISTER_HIST: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    lo_f = tl.cast(lo, tl.float32)
    hi_f = tl.cast(hi, tl.float32)
    inv_f = tl.cast(inv, tl.float32)
    nbins = tl.cast(bins, tl.int32)
    shift = tl.load(shift_ptr + c)
    n0 = g * samples_per_program
    n1 = tl.minimum(n0 + samples_per_program, N)
    s1 = tl.zeros([NB, SB], tl.float64)
    s2 = tl.zeros([NB, SB], tl.float64)
    cnt = tl.zeros([NB, SB], tl.int32)
    nan = tl.zeros([NB, SB], tl.int32)
    mn = tl.full([NB, SB], float("inf"), tl.float32)
    mx = tl.full([NB, SB], float("-inf"), tl.float32)
    hist = tl.zeros([HB], tl.int32)
    out = c * G + g
    row = out * (nbins + 2)
    base = x_ptr + c * stride_c
    for n in range(n0, n1, NB):
        ns = n + tl.arange(0, NB).to(tl.int64)
        for p in range(0, S, SB):
            ps = p + tl.arange(0, SB).to(tl.int64)
            inb = (ns < n1)[:, None] & (ps < S)[None, :]
            v = tl.load(base + ns[:, None] * stride_n + ps[None, :], mask=inb, other=0.0).to(tl.float32)
            isnan = v != v
            ok = inb & (~isnan)
            d = tl.where(ok, v - shift, 0.0).to(tl.float64)  # squares of spreads past 1.8e19 overflow float32
            s1 += d
            s2 += d * d
            cnt += ok.to(tl.int32)
            nan += (inb & isnan).to(tl.int32)
            mn = tl.where(ok & (v < mn), v, mn)
            mx = tl.where(ok & (v > mx), v, mx)
            col = _column(v, ok, lo_f, hi_f, inv_f, nbins)
            if REGISTER_HIST:
                hist += tl.histogram(tl.reshape(col, [NB * SB]), HB, mask=tl.reshape(ok, [NB * SB]))
            else:
                tl.atomic_add(hist_ptr + row + col, tl.full([NB, SB], 1, tl.int32), mask=ok)
    tl.store(cnt_ptr + out, tl.sum(tl.sum(cnt, axis=1), axis=0))
    tl.store(nan_ptr + out, tl.sum(tl.sum(nan, axis=1), axis=0))
    tl.store(s1_ptr + out, tl.sum(tl.sum(s1, axis=1), axis=0))
    tl.store(s2_ptr + out, tl.sum(tl.sum(s2, axis=1), axis=0))
    tl.store(min_ptr + out, tl.min(tl.min(mn, axis=1), axis=0))
    tl.store(max_ptr + out, tl.max(tl.max(mx, axis=1), axis=0))
    if REGISTER_HIST:
        cols = tl.arange(0, HB)
        tl.store(hist_ptr + row + cols, hist, mask=cols < nbins + 2)


@triton.jit
def _rows_kernel(
    x_ptr,
    shift_ptr,
    cnt_ptr,
    nan_ptr,
    s1_ptr,
    s2_ptr,
    min_ptr,
    max_ptr,
    hist_ptr,
    R,
    C,
    G,
    rows_per_program,
    lo,
    hi,
    inv,
    bins,
    RB: tl.constexpr,
    CB: tl.constexpr,
    HB: tl.constexpr,
    REGISTER_HIST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    lo_f = tl.cast(lo, tl.float32)
    hi_f = tl.cast(hi, tl.float32)
    inv_f = tl.cast(inv, tl.float32)
    nbins = tl.cast(bins, tl.int32)
    cs = b * CB + tl.arange(0, CB).to(tl.int64)
    cin = cs < C
    shift = tl.load(shift_ptr + cs, mask=cin, other=0.0)
    r0 = g * rows_per_program
    r1 = tl.minimum(r0 + rows_per_program, R)
    s1 = tl.zeros([RB, CB], tl.float64)
    s2 = tl.zeros([RB, CB], tl.float64)
    cnt = tl.zeros([RB, CB], tl.int32)
    nan = tl.zeros([RB, CB], tl.int32)
    mn = tl.full([RB, CB], float("inf"), tl.float32)
    mx = tl.full([RB, CB], float("-inf"), tl.float32)
    hist = tl.zeros([HB], tl.int32)
    outs = cs * G + g
    # column j of this tile's channel i is counted at i * (bins + 2) + j
    local = tl.arange(0, CB)[None, :] * (nbins + 2)
    rows_out = outs[None, :] * (nbins + 2)
    for r in range(r0, r1, RB):
        rs = r + tl.arange(0, RB).to(tl.int64)
        inb = (rs < r1)[:, None] & cin[None, :]
        v = tl.load(x_ptr + rs[:, None] * C + cs[None, :], mask=inb, other=0.0).to(tl.float32)
        isnan = v != v
        ok = inb & (~isnan)
        d = tl.where(ok, v - shift[None, :], 0.0).to(tl.float64)  # squares past 1.8e19 overflow float32
        s1 += d
        s2 += d * d
        cnt += ok.to(tl.int32)
        nan += (inb & isnan).to(tl.int32)
        mn = tl.where(ok & (v < mn), v, mn)
        mx = tl.where(ok & (v > mx), v, mx)
        col = _column(v, ok, lo_f, hi_f, inv_f, nbins)
        if REGISTER_HIST:
            hist += tl.histogram(tl.reshape(col + local, [RB * CB]), HB, mask=tl.reshape(ok, [RB * CB]))
        else:
            tl.atomic_add(hist_ptr + rows_out + col, tl.full([RB, CB], 1, tl.int32), mask=ok)
    tl.store(cnt_ptr + outs, tl.sum(cnt, axis=0), mask=cin)
    tl.store(nan_ptr + outs, tl.sum(nan, axis=0), mask=cin)
    tl.store(s1_ptr + outs, tl.sum(s1, axis=0), mask=cin)
    tl.store(s2_ptr + outs, tl.sum(s2, axis=0), mask=cin)
    tl.store(min_ptr + outs, tl.min(mn, axis=0), mask=cin)
    tl.store(max_ptr + outs, tl.max(mx, axis=0), mask=cin)
    if REGISTER_HIST:
        idx = tl.arange(0, HB)
        channel = idx // (nbins + 2)
        column = idx - channel * (nbins + 2)
        target = (b * CB + channel) * G + g
        tl.store(hist_ptr + target * (nbins + 2) + column, hist, mask=(channel < CB) & (b * CB + channel < C))


def _launch_partials(x: torch.Tensor, shift: torch.Tensor, lo: float, hi: float, bins: int):
    """Launches the partials kernel that reads ``x`` along its contiguous dimension. Returns
    (G, counts, nan counts, s1, s2, min, max, histograms) with C * G partials each."""
    N, C = x.shape[0], x.shape[1]
    S = x[0, 0].numel()
    H = bins + 2
    rows = x.dim() == 2 or not x.is_contiguous()  # channels innermost: (N, C) or channels_last
    G = triton.cdiv(N * S, VALUES_PER_PROGRAM)
    dev = x.device
    cnt = torch.empty(C * G, dtype=torch.int32, device=dev)
    nan = torch.empty(C * G, dtype=torch.int32, device=dev)
    s1 = torch.empty(C * G, dtype=torch.float64, device=dev)
    s2 = torch.empty(C * G, dtype=torch.float64, device=dev)
    pmin = torch.empty(C * G, dtype=torch.float32, device=dev)
    pmax = torch.empty(C * G, dtype=torch.float32, device=dev)
    phist = torch.zeros(C * G, H, dtype=torch.int32, device=dev)
    scalars = (lo, hi, bins / (hi - lo), bins)
    outs = (cnt, nan, s1, s2, pmin, pmax, phist)
    if rows:
        cb = min(ROW_CHANNELS, triton.next_power_of_2(C))
        while cb > 1 and cb * H > HIST_REGISTERS:
            cb //= 2
        R = N * S
        per = triton.cdiv(R, G)
        rb = max(1, BLOCK // cb)
        wrap_triton(_rows_kernel)[(triton.cdiv(C, cb), G)](
            x,
            shift,
            *outs,
            R,
            C,
            G,
            per,
            *scalars,
            RB=rb,
            CB=cb,
            HB=triton.next_power_of_2(cb * H),
            REGISTER_HIST=cb * H <= HIST_REGISTERS,
        )
    else:
        sb = min(BLOCK, triton.next_power_of_2(S))
        per = triton.cdiv(N, G)
        wrap_triton(_runs_kernel)[(C, G)](
            x,
            shift,
            *outs,
            N,
            S,
            x.stride(0),
            x.stride(1),
            G,
            per,
            *scalars,
            NB=BLOCK // sb,
            SB=sb,
            HB=triton.next_power_of_2(H),
            REGISTER_HIST=H <= HIST_REGISTERS,
        )
    return (G, *outs)


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
    N, C = x.shape[0], x.shape[1]
    if N == 0:
        return
    S = x[0, 0].numel()
    bins = hist.shape[1] - 2
    with _common.on_device_of(x):
        first = x[0].float().reshape(C, -1)
        first_mean = torch.nan_to_num(torch.nanmean(first, dim=1), nan=0.0)
        shift = torch.where(count > 0, mean.float(), first_mean).contiguous()
        G, cnt, nan, s1, s2, pmin, pmax, phist = _launch_partials(x, shift, lo, hi, bins)
        old_count = count.clone()
        total, new_mean, new_m2 = merge_partials(
            count, mean, m2, shift, cnt.view(C, G).to(torch.int64), s1.view(C, G), s2.view(C, G)
        )
        minimum.copy_(torch.minimum(minimum, pmin.view(C, G).amin(1)))
        maximum.copy_(torch.maximum(maximum, pmax.view(C, G).amax(1)))
        nan_count.add_(nan.view(C, G).sum(1).to(torch.int64))
        hist.add_(phist.view(C, G, bins + 2).sum(1).to(torch.int64))
        v = channel_view(x)
        valid = ~torch.isnan(v)
        values, keys, ok = preselect_topk(v, valid, sample_offset * S, topk_values.shape[1])
        buffer = None
        if qbuf.shape[1]:
            width = min(qbuf.shape[1], v.shape[1])
            buffer = torch.topk(torch.where(valid, v, float("-inf")), width, dim=1).values
        merge_selection_(
            topk_values,
            topk_sample,
            topk_pos,
            qbuf,
            old_count,
            values,
            keys,
            ok,
            spatial_size=S,
            buffer_candidates=buffer,
        )
        count.copy_(total)
        mean.copy_(new_mean)
        m2.copy_(new_m2)
        infinite_moments_(mean, m2, minimum, maximum)
