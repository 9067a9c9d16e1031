"""Streaming per-channel statistics of activations: one fused pass per batch.

``channel_stats_update(state, activations, sample_offset)`` folds a batch of activations of shape
(N, C) or (N, C, *spatial) (float32/float16/bfloat16, contiguous or channels_last) into a
:class:`ChannelStats` state, per channel c, over the values ``a[n, c, p]`` (n the sample, p the
flat spatial position in row-major order of ``spatial``, whatever the memory layout):

* ``nan_count``: NaN values; every other statistic leaves them out.
* ``count``: the non-NaN values seen (±inf included).
* ``mean``, ``m2`` (float64): mean and sum of squared deviations, combined over batches and
  blocks with Chan's parallel formula ``M2 = M2_a + M2_b + δ² n_a n_b / n``; variance ``m2/count``
  (population) or ``m2/(count-1)``. Accurate in float32 input over 10^9 values: the bodies sum
  blocks of at most a few thousand values *shifted* by a value of the block (so a large common
  offset cancels) and merge the blocks in float64. **Infinite values**: a channel that has seen
  +inf or -inf has the moments IEEE arithmetic gives over all its values, in every body and
  whatever the batches: mean +inf (only +inf seen), -inf (only -inf seen) or NaN (both), and
  ``m2`` NaN (so the variance and std are NaN). They are kept as values everywhere else: in
  min/max, the histogram's under/overflow columns, the top-k and the quantile buffer.
* ``minimum``, ``maximum`` (float32; +inf / -inf while count is 0).
* ``hist`` (int64, (C, bins + 2)): column 0 counts values < lo, column bins + 1 values > hi, and a
  value v in [lo, hi] goes to column ``1 + min(floor((v - lo) * inv), bins - 1)`` with
  ``inv = float32(bins / (hi - lo))`` and the arithmetic in float32 (every body computes the bin
  this way, so histograms are equal bit for bit). ±inf fall in the under/overflow columns.
* ``hist_moved`` (int64, (C,), not an op argument): 0 unless states with different histogram
  ranges were merged (:func:`merge_states` re-bins them onto the union range): then an upper
  bound on the values of the channel whose column may differ from the one an update would have
  given them on the merged grid (see :func:`rebin`).
* ``topk_values`` / ``topk_sample`` / ``topk_pos`` ((C, K)): the K largest values seen, largest
  first, with the dataset index of their sample (``sample_offset + n``) and their flat spatial
  position. **Ties**: among equal values the smaller (sample, position) comes first, so the
  result does not depend on how the data was split into batches, blocks, shards or threads.
  Only the first ``min(count, K)`` entries are meaningful (the rest: value -inf, indices -1).
* ``qbuf`` ((C, M) float32): the M largest values, largest first (no indices): the buffer from
  which :func:`quantile_threshold` computes the exact upper quantile (see there). M may be 0.

All updates happen in place on the state's tensors (the op schema marks them ``Tensor(a!)``):
a stream of batches never reallocates. Arguments are checked before anything is written, so a
failed update leaves the state as it was.

Bodies: ``torch`` (:func:`channel_stats_update_reference`, the definition), ``cpp`` (csrc/
channel_stats.cpp: per (channel, sample-group) partials in parallel, then a per-channel merge;
top-k and the quantile buffer through bounded heaps; channels_last / (N, C) batches and batches
with fewer than 256 positions are first transposed to (C, N, *spatial), one extra copy, so each
channel is read as one contiguous run), ``cuda`` (csrc/cuda/channel_stats.cu: block
partials of the moments, min/max and histogram, merged per channel; the top-k and quantile-buffer
merge runs as ATen sorts on the device) and ``triton`` (kernels/channel_stats.py: Triton programs
write per (channel, sample-group) partial moments/min/max/NaN counts/histograms; the partials are
merged in float64 and the top-k / buffer merge is :func:`merge_topk` (torch sorts), as in the
reference).

Files: this module is the op (schema, torch body, checks, dispatch) and re-exports the rest:
:class:`ChannelStats` and state-dict validation in ``channel_stats_state.py``, the merge algebra
the torch and Triton bodies share in ``pyadvk/_channel_merge.py`` (a leaf, which kernels/ imports
instead of this package), :func:`merge_states` / :func:`rebin` in ``channel_stats_merge.py``,
:func:`quantile_threshold` in ``channel_stats_quantiles.py``.
"""

from __future__ import annotations

import math

import torch

from pyadvk import _backend, _checks
from pyadvk._channel_merge import (
    bin_columns,
    chan_merge,
    channel_view,
    infinite_moments_,
    merge_buffers,
    merge_partials,
    merge_selection_,
    merge_topk,
    preselect_topk,
)
from pyadvk._layout import dense_format
from pyadvk.ops._library import define
from pyadvk.ops.channel_stats_merge import dyadic_range, merge_states, merged_range, rebin
from pyadvk.ops.channel_stats_quantiles import check_quantile, quantile_capacity, quantile_threshold
from pyadvk.ops.channel_stats_state import ChannelStats, validate_state_dict

__all__ = [
    "UPDATE",
    "ChannelStats",
    "bin_columns",
    "chan_merge",
    "channel_stats_update",
    "channel_stats_update_reference",
    "channel_view",
    "check_quantile",
    "check_update",
    "dyadic_range",
    "infinite_moments_",
    "merge_buffers",
    "merge_partials",
    "merge_selection_",
    "merge_states",
    "merge_topk",
    "merged_range",
    "preselect_topk",
    "quantile_capacity",
    "quantile_threshold",
    "rebin",
    "validate_state_dict",
]

_STATE_ARGS = (
    "Tensor(a!) count, Tensor(b!) nan_count, Tensor(c!) mean, Tensor(d!) m2, Tensor(e!) minimum, "
    "Tensor(f!) maximum, Tensor(g!) hist, Tensor(h!) topk_values, Tensor(i!) topk_sample, "
    "Tensor(j!) topk_pos, Tensor(k!) qbuf"
)
define(f"channel_stats_update_({_STATE_ARGS}, Tensor x, int sample_offset, float lo, float hi) -> ()")


@torch.library.register_fake("pyadvk::channel_stats_update_")
def _fake_update(
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
    x,
    sample_offset,
    lo,
    hi,
):
    return None


UPDATE = _backend.OpBodies("channel_stats_update", native_ops=("channel_stats_update_",))


# ---------------------------------------------------------------------------------------------
# The torch body: the definition of the op.


def channel_stats_update_reference(
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
    x,
    sample_offset,
    lo,
    hi,
) -> None:
    """Updates the state tensors in place with the batch ``x`` (see the module docstring)."""
    n, c = x.shape[0], x.shape[1]
    spatial = x[0, 0].numel() if n else int(math.prod(x.shape[2:]))
    v = channel_view(x)  # (C, L)
    valid = ~torch.isnan(v)
    nb = valid.sum(1)
    v64 = torch.where(valid, v.double(), 0.0)
    mean_b = v64.sum(1) / nb.clamp(min=1)
    m2_b = torch.where(valid, (v.double() - mean_b[:, None]) ** 2, 0.0).sum(1)
    old_count = count.clone()
    new_n, new_mean, new_m2 = chan_merge(count, mean, m2, nb, mean_b, m2_b)
    if v.shape[1]:
        minimum.copy_(torch.minimum(minimum, torch.where(valid, v, math.inf).amin(1)))
        maximum.copy_(torch.maximum(maximum, torch.where(valid, v, -math.inf).amax(1)))
    bins = hist.shape[1] - 2
    cols = bin_columns(torch.where(valid, v, 0.0), lo, hi, bins)
    hist.add_(torch.zeros_like(hist).scatter_add_(1, cols, valid.to(torch.int64)))
    nan_count.add_((~valid).sum(1))
    keys = (sample_offset * spatial + torch.arange(v.shape[1], device=v.device)).expand(c, -1)
    merge_selection_(topk_values, topk_sample, topk_pos, qbuf, old_count, v, keys, valid, spatial_size=max(spatial, 1))
    count.copy_(new_n)
    mean.copy_(new_mean)
    m2.copy_(new_m2)
    infinite_moments_(mean, m2, minimum, maximum)


# ---------------------------------------------------------------------------------------------
# Public API.


def check_update(state: ChannelStats, activations: torch.Tensor, sample_offset: int) -> int:
    """Checks the arguments of an update; returns the spatial size S."""
    if not isinstance(state, ChannelStats):
        raise TypeError(f"state must be a pyadvk.ops.ChannelStats, got {type(state).__name__}")
    _checks.tensor("activations", activations, min_dim=2)
    sample_offset = _checks.integer("sample_offset", sample_offset, low=0)
    if activations.shape[1] != state.channels:
        raise ValueError(
            f"activations must have {state.channels} channels (dim 1) like the state, "
            f"got shape {tuple(activations.shape)}"
        )
    if activations.device != state.count.device:
        raise ValueError(f"activations must be on the state's device ({state.count.device}), got {activations.device}")
    spatial = int(math.prod(activations.shape[2:]))
    if spatial == 0:
        raise ValueError(f"activations must have a non-empty spatial size, got shape {tuple(activations.shape)}")
    if state.spatial_size is not None and spatial != state.spatial_size:
        raise ValueError(
            f"activations must have {state.spatial_size} spatial values per channel like "
            f"the earlier batches, got shape {tuple(activations.shape)}"
        )
    return spatial


def channel_stats_update(
    state: ChannelStats, activations: torch.Tensor, sample_offset: int = 0, *, backend: str | None = None
) -> ChannelStats:
    """Folds ``activations`` (N, C) or (N, C, *spatial) into ``state`` in place and returns it.

    Args:
        state: a :class:`ChannelStats` with C channels on the activations' device.
        activations: float32/float16/bfloat16; contiguous or channels_last (other layouts are
            copied to contiguous first).
        sample_offset: dataset index of ``activations[0]`` (top-k entries record
            ``sample_offset + n``); >= 0.
        backend: force a body ("cuda", "triton", "cpp", "torch"); default: see pyadvk.set_backend.
    """
    spatial = check_update(state, activations, sample_offset)
    if activations.shape[0] == 0:
        state.spatial_size = spatial
        return state
    if dense_format(activations) is None:
        activations = activations.contiguous()
    name = _backend.resolve(UPDATE, activations.device, backend)
    state.spatial_size = spatial
    args = (*state.tensors(), activations, sample_offset, state.lo, state.hi)
    if name == "torch":
        channel_stats_update_reference(*args)
    elif name == "triton":
        torch.ops.pyadvk.channel_stats_update_triton_(*args)
    else:
        torch.ops.pyadvk.channel_stats_update_(*args)
    state.samples += activations.shape[0]
    return state
