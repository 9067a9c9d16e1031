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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyadvk import _backend, _checks
from pyadvk._layout import dense_format
from pyadvk.ops._library import define

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

_TENSOR_FIELDS = (
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
)


@dataclass
class ChannelStats:
    """The running statistics of C channels (see the module docstring for each field).

    Create one with :meth:`create`; ``spatial_size`` (values per sample and channel) is fixed by
    the first update and checked on every later one, ``samples`` counts the samples seen.
    """

    count: torch.Tensor
    nan_count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    hist: torch.Tensor
    topk_values: torch.Tensor
    topk_sample: torch.Tensor
    topk_pos: torch.Tensor
    qbuf: torch.Tensor
    lo: float
    hi: float
    spatial_size: int | None = None
    samples: int = 0
    extra: dict = field(default_factory=dict)
    hist_moved: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.hist_moved is None:
            self.hist_moved = torch.zeros_like(self.count)

    @classmethod
    def create(
        cls,
        channels: int,
        *,
        topk: int = 16,
        bins: int = 64,
        lo: float = 0.0,
        hi: float = 1.0,
        quantile_capacity: int = 0,
        device: torch.device | str = "cpu",
    ) -> ChannelStats:
        """An empty state: ``topk`` >= 1 entries, ``bins`` >= 1 histogram bins over [lo, hi]
        (lo < hi, finite), a quantile buffer of ``quantile_capacity`` >= 0 values per channel."""
        channels = _checks.integer("channels", channels, low=1)
        topk = _checks.integer("topk", topk, low=1)
        bins = _checks.integer("bins", bins, low=1)
        quantile_capacity = _checks.integer("quantile_capacity", quantile_capacity, low=0)
        lo, hi = _checks.real("lo", lo), _checks.real("hi", hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"the histogram range must be finite with lo < hi, got lo={lo}, hi={hi}")
        dev = torch.device(device)
        i64 = dict(dtype=torch.int64, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        f64 = dict(dtype=torch.float64, device=dev)
        return cls(
            count=torch.zeros(channels, **i64),
            nan_count=torch.zeros(channels, **i64),
            mean=torch.zeros(channels, **f64),
            m2=torch.zeros(channels, **f64),
            minimum=torch.full((channels,), math.inf, **f32),
            maximum=torch.full((channels,), -math.inf, **f32),
            hist=torch.zeros(channels, bins + 2, **i64),
            topk_values=torch.full((channels, topk), -math.inf, **f32),
            topk_sample=torch.full((channels, topk), -1, **i64),
            topk_pos=torch.full((channels, topk), -1, **i64),
            qbuf=torch.full((channels, quantile_capacity), -math.inf, **f32),
            lo=lo,
            hi=hi,
        )

    @property
    def channels(self) -> int:
        return self.count.shape[0]

    @property
    def topk(self) -> int:
        return self.topk_values.shape[1]

    @property
    def bins(self) -> int:
        return self.hist.shape[1] - 2

    @property
    def quantile_capacity(self) -> int:
        return self.qbuf.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in _TENSOR_FIELDS)

    def clone(self) -> ChannelStats:
        return self._map(torch.Tensor.clone)

    def to(self, device) -> ChannelStats:
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> ChannelStats:
        return ChannelStats(
            *(fn(t) for t in self.tensors()),
            lo=self.lo,
            hi=self.hi,
            spatial_size=self.spatial_size,
            samples=self.samples,
            extra=dict(self.extra),
            hist_moved=fn(self.hist_moved),
        )

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """Per-channel variance (float64): m2/count, or m2/(count-1); NaN without enough values."""
        n = self.count.to(torch.float64) - (1 if unbiased else 0)
        return torch.where(n > 0, self.m2 / n.clamp_min(1), torch.full_like(self.m2, math.nan))

    def state_dict(self) -> dict:
        """Tensors (on the CPU) and settings, for torch.save (weights_only-loadable)."""
        out = {f: getattr(self, f).cpu() for f in _TENSOR_FIELDS + ("hist_moved",)}
        out.update(lo=self.lo, hi=self.hi, spatial_size=self.spatial_size, samples=self.samples)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu") -> ChannelStats:
        """The state saved by :meth:`state_dict`, after :func:`validate_state_dict` (a state read
        from a file is data: every field is checked before any body sees it)."""
        validate_state_dict(sd)
        return cls(
            *(sd[f].to(device) for f in _TENSOR_FIELDS),
            lo=float(sd["lo"]),
            hi=float(sd["hi"]),
            spatial_size=sd["spatial_size"],
            samples=int(sd["samples"]),
            hist_moved=sd["hist_moved"].to(device) if "hist_moved" in sd else None,
        )

    def check_compatible(self, other: ChannelStats, what: str = "other", *, same_range: bool = True) -> None:
        """Raises ValueError unless ``other`` has the same channels, K, bins, buffer size, spatial
        size (when both know it) and, with ``same_range``, histogram range."""
        names = ("channels", "topk", "bins", "quantile_capacity") + (("lo", "hi") if same_range else ())
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise ValueError(
                    f"{what} has {name}={b}, but this state has {name}={a}: states of "
                    "different configurations cannot be combined"
                )
        if None not in (self.spatial_size, other.spatial_size) and self.spatial_size != other.spatial_size:
            raise ValueError(
                f"{what} has spatial_size={other.spatial_size}, but this state has spatial_size={self.spatial_size}"
            )


_FIELD_DTYPES = {
    "count": torch.int64,
    "nan_count": torch.int64,
    "mean": torch.float64,
    "m2": torch.float64,
    "minimum": torch.float32,
    "maximum": torch.float32,
    "hist": torch.int64,
    "topk_values": torch.float32,
    "topk_sample": torch.int64,
    "topk_pos": torch.int64,
    "qbuf": torch.float32,
}


def validate_state_dict(sd) -> None:
    """Raises ValueError unless ``sd`` is a consistent :meth:`ChannelStats.state_dict`: every
    field present with its dtype and shape (``hist_moved`` may be absent); counts >= 0 with
    ``sum(hist[c]) == count[c]``; ``count <= samples * spatial_size``; a finite range with
    lo < hi; m2 >= 0 (or NaN, after ±inf); min <= max where count > 0; the first
    ``min(count, K)`` top-k entries sorted (largest first) with valid sample indices and
    positions, the rest empty (-inf, -1); the quantile buffer sorted; ``0 <= hist_moved <=
    count``. A tampered or damaged file fails here instead of reaching a kernel (which trusts
    these invariants)."""

    def bad(what: str) -> ValueError:
        return ValueError(f"ChannelStats state dict: {what}")

    if not isinstance(sd, dict):
        raise bad(f"expected a dict, got {type(sd).__name__}")
    missing = [k for k in _TENSOR_FIELDS + ("lo", "hi", "spatial_size", "samples") if k not in sd]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    for name in _TENSOR_FIELDS:
        t = sd[name]
        if not isinstance(t, torch.Tensor) or t.dtype != _FIELD_DTYPES[name] or t.layout != torch.strided:
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise bad(f"{name} must be a {_FIELD_DTYPES[name]} tensor, got {what}")
    count, nan_count = sd["count"], sd["nan_count"]
    if count.dim() != 1 or count.shape[0] < 1:
        raise bad(f"count must have shape (C,) with C >= 1, got {tuple(count.shape)}")
    c = count.shape[0]
    k = sd["topk_values"].shape[1] if sd["topk_values"].dim() == 2 else -1
    shapes = {
        "nan_count": (c,),
        "mean": (c,),
        "m2": (c,),
        "minimum": (c,),
        "maximum": (c,),
        "topk_values": (c, max(k, 1)),
        "topk_sample": (c, max(k, 1)),
        "topk_pos": (c, max(k, 1)),
    }
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise bad(f"{name} must have shape {shape}, got {tuple(sd[name].shape)}")
    hist, qbuf = sd["hist"], sd["qbuf"]
    if hist.dim() != 2 or hist.shape[0] != c or hist.shape[1] < 3:
        raise bad(f"hist must have shape ({c}, bins + 2) with bins >= 1, got {tuple(hist.shape)}")
    if qbuf.dim() != 2 or qbuf.shape[0] != c:
        raise bad(f"qbuf must have shape ({c}, M), got {tuple(qbuf.shape)}")
    lo, hi = sd["lo"], sd["hi"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise bad(f"lo and hi must be numbers, got {lo!r} and {hi!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise bad(f"the histogram range must be finite with lo < hi, got lo={lo}, hi={hi}")
    spatial, samples = sd["spatial_size"], sd["samples"]
    if spatial is not None and (isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 1):
        raise bad(f"spatial_size must be None or an int >= 1, got {spatial!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise bad(f"samples must be an int >= 0, got {samples!r}")
    if bool((count < 0).any()) or bool((nan_count < 0).any()) or bool((hist < 0).any()):
        raise bad("count, nan_count and hist must be >= 0")
    if not torch.equal(hist.sum(dim=1), count):
        raise bad("every channel's histogram must sum to its count (the file was changed or damaged)")
    if spatial is not None and bool((count + nan_count > samples * spatial).any()):
        raise bad(f"more values counted than samples * spatial_size = {samples} * {spatial}")
    if bool((sd["m2"] < 0).any()):
        raise bad("m2 (sum of squared deviations) must be >= 0")
    seen = count > 0
    if bool((sd["minimum"][seen] > sd["maximum"][seen]).any()):
        raise bad("minimum must be <= maximum in every channel with values")
    values, sample, pos = sd["topk_values"], sd["topk_sample"], sd["topk_pos"]
    if bool(torch.isnan(values).any()) or bool(torch.isnan(qbuf).any()):
        raise bad("top-k values and the quantile buffer must not hold NaN (NaN values are only counted)")
    used = torch.arange(values.shape[1], device=values.device)[None, :] < count.clamp(max=values.shape[1])[:, None]
    if bool((sample[used] < 0).any()) or bool((pos[used] < 0).any()):
        raise bad("top-k sample indices and positions must be >= 0")
    if spatial is not None and bool((pos[used] >= spatial).any()):
        raise bad(f"top-k positions must be < spatial_size = {spatial}")
    if bool((values[~used] != -math.inf).any()) or bool((sample[~used] != -1).any()) or bool((pos[~used] != -1).any()):
        raise bad("top-k entries past min(count, K) must be empty (value -inf, indices -1)")
    if values.shape[1] > 1 and bool((values[:, 1:] > values[:, :-1]).any()):
        raise bad("top-k values must be sorted, largest first")
    if qbuf.shape[1] > 1 and bool((qbuf[:, 1:] > qbuf[:, :-1]).any()):
        raise bad("the quantile buffer must be sorted, largest first")
    if "hist_moved" in sd:  # absent from files written before merges re-binned
        moved = sd["hist_moved"]
        if not isinstance(moved, torch.Tensor) or moved.dtype != torch.int64 or tuple(moved.shape) != (c,):
            what = (moved.dtype, tuple(moved.shape)) if isinstance(moved, torch.Tensor) else type(moved).__name__
            raise bad(f"hist_moved must be an int64 tensor of shape ({c},), got {what}")
        if bool((moved < 0).any()) or bool((moved > count).any()):
            raise bad("hist_moved must lie in [0, count] in every channel")


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
    state = ChannelStats(
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
        spatial_size=max(spatial, 1),
    )
    merge_selection_(state, old_count, v, keys, valid)
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
