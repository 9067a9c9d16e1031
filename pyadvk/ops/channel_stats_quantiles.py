"""Upper quantiles of per-channel statistics (:mod:`pyadvk.ops.channel_stats`): the exact quantile
from the state's buffer of largest values, or the histogram's estimate past it."""

from __future__ import annotations

import math

import torch

from pyadvk import _checks
from pyadvk.ops.channel_stats_state import ChannelStats


def quantile_capacity(q: float, count: int) -> int:
    """Buffer size M that makes :func:`quantile_threshold` exact for up to ``count`` values:
    the linear interpolation at 1 - q needs the ``ceil(q (n - 1)) + 1`` largest values; one more
    covers the float32 rounding of the rank ``(1 - q)(n - 1)`` that torch.quantile computes."""
    q = check_quantile(q)
    count = _checks.integer("count", count, low=0)
    return min(count, math.ceil(q * max(count - 1, 0)) + 2)


def check_quantile(q) -> float:
    q = _checks.real("quantile", q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must lie in (0, 1) (the upper tail probability), got {q}")
    return q


def quantile_threshold(state: ChannelStats, q: float = 0.005) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel T with P(a > T) = q: the value ``torch.quantile(a, 1 - q)`` (linear
    interpolation) of the channel's non-NaN values (``torch.nanquantile``), or NaN for a channel
    without values.

    Exact when the quantile buffer holds the ``ceil(q (count - 1)) + 1`` largest values (see
    :func:`quantile_capacity`: size the buffer from the number of values when it is known in
    advance): then the result equals torch.quantile on all values, bit for bit. Otherwise
    (the count was not known, the buffer is too small) the threshold is read off the histogram:
    the value at rank ``(1 - q)(count - 1)`` interpolated linearly inside its bin, which is
    within one bin width ``(hi - lo) / bins`` of the exact value when that rank falls inside
    [lo, hi]; when it falls in the under/overflow column the result is NaN.

    Returns (thresholds float32 (C,), exact bool (C,)).
    """
    q = check_quantile(q)
    count = state.count.cpu()
    out = torch.full((state.channels,), math.nan, dtype=torch.float32)
    exact = torch.zeros(state.channels, dtype=torch.bool)
    qf = torch.tensor(1.0 - q, dtype=torch.float32)
    buf = state.qbuf.cpu()
    hist = state.hist.cpu()
    for c in range(state.channels):
        n = int(count[c])
        if n == 0:
            continue
        rank = qf * (n - 1)  # float32, as torch.quantile computes it
        below = int(rank.to(torch.int64))
        above = int(torch.ceil(rank).to(torch.int64))
        need = n - below  # the largest values down to sorted index `below`
        if need <= state.quantile_capacity:
            # ascending sorted index i is buffer index n - 1 - i
            vb = buf[c, n - 1 - below]
            va = buf[c, n - 1 - above]
            out[c] = torch.lerp(vb.reshape(1), va.reshape(1), (rank - below).reshape(1))[0]
            exact[c] = True
        else:
            out[c] = _histogram_quantile(hist[c], float(rank), state.lo, state.hi)
    return out, exact


def _histogram_quantile(hist: torch.Tensor, rank: float, lo: float, hi: float) -> float:
    """Estimate of the value at fractional ascending rank ``rank`` (0-based) from a histogram with
    under/overflow columns: the j-th of the h values of a bin is placed at ``(j + 0.5) / h`` of
    the bin, and fractional ranks interpolate linearly between the two neighbouring ranks. Each
    placed value lies in the bin of the true one, so the error is at most one bin width; NaN when
    a needed rank lies in the under/overflow column."""
    bins = hist.shape[0] - 2
    cum = torch.cumsum(hist, 0)
    width = (hi - lo) / bins

    def at(r: int) -> float:
        col = int(torch.searchsorted(cum, torch.tensor([r], dtype=cum.dtype), right=True)[0])
        if col == 0 or col >= bins + 1:
            return math.nan
        before = int(cum[col - 1])
        return lo + (col - 1 + (r - before + 0.5) / int(hist[col])) * width

    below, frac = math.floor(rank), rank - math.floor(rank)
    vb = at(below)
    return vb if frac == 0 else vb + frac * (at(below + 1) - vb)
