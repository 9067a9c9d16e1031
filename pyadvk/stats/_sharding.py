"""Combining shards of :class:`pyadvk.stats.NeuronStats`: :meth:`merge` of two objects (several jobs,
a resumed run) and :meth:`sync` over torch.distributed ranks, both giving the statistics of one
pass over all the data (see pyadvk/stats/neuron_stats.py). A mixin of NeuronStats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pyadvk import distributed
from pyadvk.ops import channel_stats as cs
from pyadvk.stats._base import StatsBase

if TYPE_CHECKING:
    from typing_extensions import Self


class Sharding(StatsBase):
    """merge / sync of NeuronStats (see there)."""

    def _end_index(self) -> int:
        """One past the largest dataset index of the samples seen (0 before any)."""
        start, step = self.sample_index
        return start + step * (self.samples - 1) + 1 if self.samples else 0

    def _set_merged(self, states: dict[str, cs.ChannelStats | None], samples: int) -> None:
        for name, s in states.items():
            old = self.states[name]
            self.states[name] = s if s is None or old is None else s.to(old.count.device)
        self.samples = samples
        self.sample_index = (0, 1)
        self.sample_index_given = True

    @staticmethod
    def _merge_one(a: cs.ChannelStats | None, b: cs.ChannelStats | None, layer: str) -> cs.ChannelStats | None:
        if a is None or b is None:
            return a if b is None else b
        try:
            return cs.merge_states(a, b)
        except ValueError as exc:
            raise ValueError(f"layer {layer!r}: {exc}") from None

    def merge(self, other: Self) -> Self:
        """Combines another shard's statistics into this object (in place; returns self): the
        result equals one pass over both shards' data (the histogram re-binned when the ranges
        differ; see the module docstring). Sample indices are mapped to dataset indices first,
        after which ``sample_index`` is (0, 1); a shard without a ``sample_index`` of its own is
        numbered after this one's samples (two halves of a dataset tracked one after the other
        merge like one pass in dataset order)."""
        if not isinstance(other, type(self)):
            raise TypeError(f"other must be a {type(self).__name__}, got {type(other).__name__}")
        self._check_config(other._config(), "the other NeuronStats")
        self._check_whole("merge")
        other._check_whole("merge the other NeuronStats")
        mine = _globalized(self.states, self.sample_index)
        start, step = other.sample_index if other.sample_index_given else (self._end_index(), 1)
        theirs = _globalized(other.states, (start, step))
        merged = {name: self._merge_one(mine[name], theirs[name], name) for name in self.layers}
        for name in self.layers:
            if self.spatial_shapes[name] is None:
                self.spatial_shapes[name] = other.spatial_shapes[name]
        self._set_merged(merged, self.samples + other.samples)
        return self

    def sync(self) -> Self:
        """Combines the statistics of every torch.distributed rank (a no-op without a process
        group): each rank's states are all-gathered and merged in rank order (moments with the
        parallel-variance formula, top-k and quantile buffers by selection), so every rank ends
        up with the statistics of one pass over all shards (histograms re-binned when their ranges
        differ; ranks without a ``sample_index`` are numbered in rank order). Collective: call on
        every rank."""
        if not distributed.is_distributed():
            return self
        self._check_whole("sync")
        import torch.distributed as dist

        payload = {
            "config": self._config(),
            "samples": self.samples,
            "sample_index": self.sample_index,
            "sample_index_given": self.sample_index_given,
            "spatial_shapes": self.spatial_shapes,
            "states": {k: (v.state_dict() if v is not None else None) for k, v in self.states.items()},
        }
        gathered: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(gathered, payload)
        merged: dict[str, cs.ChannelStats | None] = {name: None for name in self.layers}
        samples = end = 0
        for r, part in enumerate(gathered):
            self._check_config(part["config"], f"rank {r}'s NeuronStats")
            start, step = part["sample_index"] if part["sample_index_given"] else (end, 1)
            if part["samples"]:
                end = max(end, start + step * (part["samples"] - 1) + 1)
            samples += part["samples"]
            states = {k: None if v is None else cs.ChannelStats.from_state_dict(v) for k, v in part["states"].items()}
            states = _globalized(states, (start, step))
            for name in self.layers:
                merged[name] = self._merge_one(merged[name], states[name], name)
                if self.spatial_shapes[name] is None and part["spatial_shapes"][name] is not None:
                    self.spatial_shapes[name] = tuple(part["spatial_shapes"][name])
        self._set_merged(merged, samples)
        return self

    all_reduce = sync


def _globalized(
    states: dict[str, cs.ChannelStats | None], sample_index: tuple[int, int]
) -> dict[str, cs.ChannelStats | None]:
    """CPU copies of ``states`` with top-k sample indices mapped to dataset indices start + step·i."""
    start, step = sample_index
    out: dict[str, cs.ChannelStats | None] = {}
    for name, s in states.items():
        g = None if s is None else s.to("cpu")
        if g is not None:
            g.topk_sample = torch.where(g.topk_sample >= 0, start + step * g.topk_sample, -1)
        out[name] = g
    return out
