"""Persistence of :class:`pyadvk.stats.NeuronStats`: state dicts (checked in full before anything
changes), and files written atomically, read only after their zip archive is checked. A mixin of
NeuronStats (whose constructor sets the attributes used here, declared in _base.py)."""

from __future__ import annotations

import os
from typing import Any

import torch

from pyadvk import distributed
from pyadvk._io import check_archive, save_torch
from pyadvk.ops import channel_stats as cs
from pyadvk.stats._base import StatsBase

FORMAT = "pyadvk-neuron-stats/1"


class Persistence(StatsBase):
    """state_dict / load_state_dict / save / load of NeuronStats (see there)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors on the CPU; loadable with weights_only=True).
        Refused (RuntimeError) after a batch interrupted between two layers: see :meth:`load`."""
        self._check_whole("save the statistics")
        return {
            "format": FORMAT,
            "config": self._config(),
            "samples": self.samples,
            "sample_index": list(self.sample_index),
            "sample_index_given": self.sample_index_given,
            "world_size": distributed.world_size(),
            "spatial_shapes": {k: (list(v) if v is not None else None) for k, v in self.spatial_shapes.items()},
            "states": {k: (v.state_dict() if v is not None else None) for k, v in self.states.items()},
        }

    def load_state_dict(self, sd: dict[str, Any], *, check_world_size: bool = True) -> None:
        """Restores a :meth:`state_dict` of an object with the same configuration; :meth:`track`
        then resumes after the samples already seen. Nothing changes when the check fails."""
        if not isinstance(sd, dict) or sd.get("format") != FORMAT:
            raise ValueError(
                f"not a NeuronStats state dict (format {sd.get('format') if isinstance(sd, dict) else None!r}, "
                f"expected {FORMAT!r})"
            )
        missing = [k for k in ("config", "samples", "sample_index", "spatial_shapes", "states") if k not in sd]
        if missing:
            raise ValueError(f"NeuronStats state dict lacks {', '.join(missing)}")
        if not isinstance(sd["config"], dict):
            raise ValueError(f"NeuronStats state dict: config must be a dict, got {type(sd['config']).__name__}")
        self._check_config(sd["config"], "the state dict")
        if check_world_size:
            distributed.check_world_size(sd.get("world_size"), "the NeuronStats state")
        samples = sd["samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"NeuronStats state dict: samples must be an int >= 0, got {samples!r}")
        sample_index = self._check_index(sd["sample_index"])
        given = sd.get("sample_index_given", sample_index != (0, 1))
        if not isinstance(given, bool):
            raise ValueError(f"NeuronStats state dict: sample_index_given must be a bool, got {given!r}")
        if not isinstance(sd["states"], dict) or not isinstance(sd["spatial_shapes"], dict):
            raise ValueError("NeuronStats state dict: states and spatial_shapes must be dicts")
        states: dict[str, cs.ChannelStats | None] = {}
        for name in self.layers:
            s = sd["states"].get(name)
            try:
                states[name] = None if s is None else cs.ChannelStats.from_state_dict(s)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from exc
            state = states[name]
            if state is not None and state.samples > samples:
                raise ValueError(
                    f"layer {name!r}: its state counts {state.samples} samples, more than the {samples} seen"
                )
        spatial_shapes = {}
        for k, v in sd["spatial_shapes"].items():
            if v is not None and not (isinstance(v, (list, tuple)) and all(isinstance(d, int) and d >= 1 for d in v)):
                raise ValueError(
                    f"NeuronStats state dict: spatial shape of {k!r} must be a list of ints >= 1, got {v!r}"
                )
            spatial_shapes[k] = tuple(v) if v is not None else None
        # every check passed: only now is anything changed
        self.states = states
        self.spatial_shapes = spatial_shapes
        self.samples = samples
        self.sample_index = sample_index
        self.sample_index_given = given
        self._batch, self._pending = None, []

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`state_dict` atomically (torch.save)."""
        save_torch(self.state_dict(), path)

    def load(self, path: str | os.PathLike, *, check_world_size: bool = True) -> None:
        """Restores a file written by :meth:`save` (its zip archive checked first: a damaged file
        raises :class:`pyadvk._io.CorruptFileError`)."""
        check_archive(path, "statistics file")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), check_world_size=check_world_size)
