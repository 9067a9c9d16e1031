"""What the parts of :class:`pyadvk.stats.NeuronStats` share: the attributes its constructor sets
(declared once here, for the reader and the type checker), its configuration, and the checks
that tracking (neuron_stats.py), persistence (_persistence.py) and sharding (_sharding.py) all
use. The base class of both mixins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from pyadvk import _checks
from pyadvk.ops import channel_stats as cs

# (lo, hi) for every layer, or {layer: (lo, hi)}; None: from each layer's first batch.
HistogramRange = tuple[float, float] | dict[str, tuple[float, float]]


def _check_range(value: object, layers: Sequence[str]) -> Any:
    """None, (lo, hi) for every layer, or {layer: (lo, hi)}: finite with lo < hi. Returns it with
    tuples for pairs (the type is that of ``value``: None, a pair, or a dict of pairs)."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = [k for k in value if k not in layers]
        if unknown:
            raise ValueError(f"histogram_range names {unknown[0]!r}, which is not one of the layers {layers}")
        return {k: _check_range(v, layers) for k, v in value.items()}
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"histogram_range must be (lo, hi) or a dict of them per layer, got {value!r}")
    lo, hi = _checks.real("histogram_range[0]", value[0]), _checks.real("histogram_range[1]", value[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"histogram_range must be finite with lo < hi, got {tuple(value)}")
    return (lo, hi)


class StatsBase:
    """The state of NeuronStats (set by its constructor) and the checks its parts share."""

    model: nn.Module
    layers: list[str]
    topk: int
    quantile: float
    histogram_bins: int
    histogram_range: HistogramRange | None
    num_samples: int | None
    quantile_buffer: int
    backend: str | None
    sample_index: tuple[int, int]  # (start, step): the i-th sample seen is dataset index start + step·i
    sample_index_given: bool
    states: dict[str, cs.ChannelStats | None]
    spatial_shapes: dict[str, tuple[int, ...] | None]
    samples: int  # samples seen by every layer (the offset of the next batch)
    _batch: int | None  # size of the batch in the current forward
    _pending: list[str]  # layers that folded the current batch before it ended

    @staticmethod
    def _check_index(sample_index: object) -> tuple[int, int]:
        if not (isinstance(sample_index, (tuple, list)) and len(sample_index) == 2):
            raise ValueError(f"sample_index must be a pair (start, step), got {sample_index!r}")
        start = _checks.integer("sample_index start", sample_index[0], low=0)
        step = _checks.integer("sample_index step", sample_index[1], low=1)
        return start, step

    def _check_whole(self, action: str) -> None:
        """Raises when a batch was folded into some layers but never ended (a forward interrupted,
        e.g. by Ctrl-C, between two hooked layers): those layers count samples that the others and
        the sample counter do not, and a saved or merged state would be silently inconsistent."""
        if self._pending:
            raise RuntimeError(
                f"cannot {action}: a batch was interrupted mid-forward after layer(s) "
                f"{', '.join(self._pending)} counted it (the other layers and the sample counter did not); "
                "these statistics are inconsistent. Reload the last saved state (load()) and resume from it."
            )

    def _config(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "topk": self.topk,
            "quantile": self.quantile,
            "histogram_bins": self.histogram_bins,
            "histogram_range": self.histogram_range,
            "num_samples": self.num_samples,
            "quantile_buffer": self.quantile_buffer,
        }

    def _check_config(self, config: dict[str, Any], what: str) -> None:
        mine = self._config()
        for key in (
            "layers",
            "topk",
            "quantile",
            "histogram_bins",
            "histogram_range",
            "num_samples",
            "quantile_buffer",
        ):
            a, b = mine[key], config.get(key)
            if key == "histogram_range":
                b = _check_range(b, self.layers)
            if a != b:
                raise ValueError(f"{what} has {key}={b!r}, but this NeuronStats has {key}={a!r}")
