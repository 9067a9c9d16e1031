"""The state of :func:`pyadvk.ops.channel_stats_update`: :class:`ChannelStats` (its fields are
documented in pyadvk/ops/channel_stats.py) and the validation of a loaded state dict, so that no
state a kernel could write out of bounds with reaches one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pyadvk import _checks

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

        def full(shape: tuple[int, ...], value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=dev)

        i64, f32, f64 = torch.int64, torch.float32, torch.float64
        return cls(
            count=full((channels,), 0, i64),
            nan_count=full((channels,), 0, i64),
            mean=full((channels,), 0.0, f64),
            m2=full((channels,), 0.0, f64),
            minimum=full((channels,), math.inf, f32),
            maximum=full((channels,), -math.inf, f32),
            hist=full((channels, bins + 2), 0, i64),
            topk_values=full((channels, topk), -math.inf, f32),
            topk_sample=full((channels, topk), -1, i64),
            topk_pos=full((channels, topk), -1, i64),
            qbuf=full((channels, quantile_capacity), -math.inf, f32),
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
        """The tensor fields, in the order of the op's arguments (``hist_moved`` is not one)."""
        return tuple(getattr(self, f) for f in _TENSOR_FIELDS)

    def clone(self) -> ChannelStats:
        return self._map(torch.Tensor.clone)

    def to(self, device: torch.device | str) -> ChannelStats:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ChannelStats:
        return ChannelStats(
            **{f: fn(t) for f, t in zip(_TENSOR_FIELDS, self.tensors())},
            lo=self.lo,
            hi=self.hi,
            spatial_size=self.spatial_size,
            samples=self.samples,
            extra=dict(self.extra),
            hist_moved=None if self.hist_moved is None else fn(self.hist_moved),
        )

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """Per-channel variance (float64): m2/count, or m2/(count-1); NaN without enough values."""
        n = self.count.to(torch.float64) - (1 if unbiased else 0)
        return torch.where(n > 0, self.m2 / n.clamp_min(1), torch.full_like(self.m2, math.nan))

    def state_dict(self) -> dict[str, Any]:
        """Tensors (on the CPU) and settings, for torch.save (weights_only-loadable)."""
        out = {f: getattr(self, f).cpu() for f in _TENSOR_FIELDS + ("hist_moved",)}
        out.update(lo=self.lo, hi=self.hi, spatial_size=self.spatial_size, samples=self.samples)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], device: torch.device | str = "cpu") -> ChannelStats:
        """The state saved by :meth:`state_dict`, after :func:`validate_state_dict` (a state read
        from a file is data: every field is checked before any body sees it)."""
        validate_state_dict(sd)
        return cls(
            **{f: sd[f].to(device) for f in _TENSOR_FIELDS},
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


def validate_state_dict(sd: object) -> None:
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
            got = (moved.dtype, tuple(moved.shape)) if isinstance(moved, torch.Tensor) else type(moved).__name__
            raise bad(f"hist_moved must be an int64 tensor of shape ({c},), got {got}")
        if bool((moved < 0).any()) or bool((moved > count).any()):
            raise bad("hist_moved must lie in [0, count] in every channel")
