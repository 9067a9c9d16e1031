"""Per-neuron (per-channel) activation statistics over whole datasets, without storing activations.

:class:`NeuronStats` hooks named layers of a model and, for every batch that goes through the
model, folds each layer's output (N, C, *spatial) or (N, C) into a
:class:`pyadvk.ops.ChannelStats` with one fused pass (:func:`pyadvk.ops.channel_stats_update`):
count, mean, std, min, max, NaN count, a histogram, the top-k activations with the dataset index
of their image and their spatial position, and the Network Dissection threshold T_k with
P(a_k > T_k) = q, exact when ``num_samples`` is given (see
:func:`pyadvk.ops.channel_stats.quantile_threshold`).

Sample indices: the i-th sample this object sees (counting from 0) is dataset index
``start + step * i``, with ``(start, step) = sample_index`` (default (0, 1)); :meth:`track` sets
it from a :class:`pyadvk.distributed.ShardSampler` (rank, world size), so shards report dataset
indices. With a shuffling loader the indices are positions in the iteration order.

Shards combine: :meth:`merge` (two objects, e.g. several jobs or a resumed run) and :meth:`sync`
(every torch.distributed rank) give the statistics of one pass over all the data, with the default
settings too. Exact: counts, moments, min/max, the top-k with its ties (ties go to the smaller
dataset index, then the smaller position) and the quantile buffer (so exact thresholds stay
exact). The histogram is exact when the shards share its range (``histogram_range`` given, the
same on every shard); the automatic range is taken from each shard's first batch, and shards with
different ranges are re-binned onto the union range: ``results()[layer]["histogram_moved"]``
then bounds, per channel, the values that may sit in another bin than in one pass on that grid
(:func:`pyadvk.ops.channel_stats.rebin`). A shard tracked without ``sample_index`` (and not
through a :class:`pyadvk.distributed.ShardSampler`) is taken to follow the shards before it: its
samples are numbered after theirs. States of different configurations (layers, k, bins, given
histogram range, buffer size) are refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from pyadvk import _checks, distributed
from pyadvk._io import check_archive, save_figure, save_json, save_torch
from pyadvk.ops import channel_stats as cs

FORMAT = "pyadvk-neuron-stats/1"
DEFAULT_QUANTILE_BUFFER = 4096


def _check_range(value, layers):
    """None, (lo, hi) for every layer, or {layer: (lo, hi)}: finite with lo < hi."""
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


def default_range(a: torch.Tensor, bins: int) -> tuple[float, float]:
    """The histogram range chosen from a layer's first batch: its finite [min, max] widened by a
    quarter of the span on each side (later batches mostly fall inside), then the dyadic grid
    that covers it (:func:`pyadvk.ops.channel_stats.dyadic_range`), so that shards which chose
    their ranges from their own first batches merge with no value moved across a bin edge."""
    finite = a.float()[torch.isfinite(a.float())]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = hi - lo if hi > lo else max(1.0, abs(lo))
    return cs.dyadic_range(lo - span / 4, hi + span / 4, bins)


class NeuronStats:
    """Streaming statistics of the channels of ``layers`` of ``model``.

    Args:
        model: the network (hooks are attached while the object is used as a context manager or
            inside :meth:`track`).
        layers: names of submodules (as in ``model.named_modules()``) whose outputs are tracked.
        topk: activations kept per channel (>= 1), with their dataset index and position.
        quantile: upper-tail probability q of the threshold T with P(a > T) = q, in (0, 1).
        histogram_bins: bins of each channel's histogram (values outside the range are counted in
            an underflow / overflow column).
        histogram_range: (lo, hi) of the histograms, or a dict of them per layer; default: from
            each layer's first batch (:func:`default_range`: a dyadic grid, so shards merge with
            the histogram exact unless values fell outside their ranges).
        num_samples: the number of samples the pass will see in all (all shards together). With
            it, the quantile buffer holds the ``ceil(q·num_samples·S) + 2`` largest values of each
            channel (S = spatial size) and the thresholds are exact; without it the buffer holds
            ``quantile_buffer`` values and thresholds beyond it come from the histogram (within
            one bin width).
        quantile_buffer: buffer size when ``num_samples`` is not given (default 4096).
        sample_index: (start, step): the dataset index of the i-th sample seen is start + step·i;
            default (0, 1), and a shard merged after others is numbered after them.
        backend: force a body of the update op ("cuda", "triton", "cpp", "torch").
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | str,
        *,
        topk: int = 16,
        quantile: float = 0.005,
        histogram_bins: int = 64,
        histogram_range: tuple[float, float] | None = None,
        num_samples: int | None = None,
        quantile_buffer: int | None = None,
        sample_index: tuple[int, int] | None = None,
        backend: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one submodule of the model")
        modules = dict(distributed.unwrap(model).named_modules())
        valid = [name for name in modules if name]
        for name in layers:
            if name not in modules or not name:
                raise ValueError(f"layers: {name!r} is not a submodule of the model; valid names: {', '.join(valid)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a name, got {layers}")
        self.model = model
        self.layers = layers
        self._modules = {name: modules[name] for name in layers}
        self.topk = _checks.integer("topk", topk, low=1)
        self.quantile = cs.check_quantile(quantile)
        self.histogram_bins = _checks.integer("histogram_bins", histogram_bins, low=1)
        self.histogram_range = _check_range(histogram_range, layers)
        self.num_samples = None if num_samples is None else _checks.integer("num_samples", num_samples, low=1)
        self.quantile_buffer = _checks.integer(
            "quantile_buffer", DEFAULT_QUANTILE_BUFFER if quantile_buffer is None else quantile_buffer, low=0
        )
        self.sample_index = self._check_index((0, 1) if sample_index is None else sample_index)
        self.sample_index_given = sample_index is not None
        self.backend = backend
        self.states: dict[str, cs.ChannelStats | None] = {name: None for name in layers}
        self.spatial_shapes: dict[str, tuple[int, ...] | None] = {name: None for name in layers}
        self.samples = 0  # samples seen by every layer (the offset of the next batch)
        self._handles: list = []
        self._batch: int | None = None  # size of the batch in the current forward
        self._pending: list[str] = []  # layers that folded the current batch before it ended

    @staticmethod
    def _check_index(sample_index) -> tuple[int, int]:
        if not (isinstance(sample_index, (tuple, list)) and len(sample_index) == 2):
            raise ValueError(f"sample_index must be a pair (start, step), got {sample_index!r}")
        start = _checks.integer("sample_index start", sample_index[0], low=0)
        step = _checks.integer("sample_index step", sample_index[1], low=1)
        return start, step

    # -----------------------------------------------------------------------------------------
    # Hooks.

    def __enter__(self) -> NeuronStats:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        """Registers the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        # after every forward, advance the sample offset by the batch size
        self._handles.append(distributed.unwrap(self.model).register_forward_hook(self._advance))
        self._batch = None

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            self.update(name, output.detach())

        return hook

    def _advance(self, module, inputs, output) -> None:
        batch = self._batch
        self._batch = None
        self._pending = []
        if batch is not None:
            self.samples += batch

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

    def update(self, layer: str, activations: torch.Tensor) -> None:
        """Folds one layer's activations of the current batch (called by the hooks; call it
        directly to feed activations computed elsewhere, then :meth:`advance`)."""
        if activations.dim() < 2:
            raise ValueError(
                f"layer {layer!r}: activations must have at least 2 dims (N, C, ...), got shape "
                f"{tuple(activations.shape)}"
            )
        state = self.states[layer]
        if state is None:
            state = self._create(layer, activations)
        if self._batch is not None and self._batch != activations.shape[0]:
            raise ValueError(
                f"layer {layer!r} saw a batch of {activations.shape[0]} but another layer saw "
                f"{self._batch} in the same forward"
            )
        if activations.device != state.count.device:
            self.states[layer] = state = state.to(activations.device)
        if layer in self._pending:
            self._check_whole("fold another batch")
        cs.channel_stats_update(state, activations, self.samples, backend=self.backend)
        self._batch = activations.shape[0]
        self._pending.append(layer)

    def advance(self, batch: int | None = None) -> None:
        """Ends a batch fed through :meth:`update` (the hooks do this themselves)."""
        if batch is not None:
            self._batch = batch
        self._advance(None, None, None)

    def _create(self, layer: str, a: torch.Tensor) -> cs.ChannelStats:
        channels = a.shape[1]
        spatial = int(math.prod(a.shape[2:]))
        given = self.histogram_range
        if isinstance(given, dict):
            given = given.get(layer)
        if given is not None:
            lo, hi = given
        else:
            lo, hi = default_range(a, self.histogram_bins)
        if self.num_samples is not None:
            m = cs.quantile_capacity(self.quantile, self.num_samples * spatial)
        else:
            m = self.quantile_buffer
        state = cs.ChannelStats.create(
            channels, topk=self.topk, bins=self.histogram_bins, lo=lo, hi=hi, quantile_capacity=m, device=a.device
        )
        self.states[layer] = state
        self.spatial_shapes[layer] = tuple(a.shape[2:])
        return state

    # -----------------------------------------------------------------------------------------
    # Iterating a loader.

    def track(
        self,
        loader: Iterable,
        *,
        device: torch.device | str | None = None,
        progress: bool = True,
        max_samples: int | None = None,
    ) -> NeuronStats:
        """Runs the model over ``loader`` (batches ``x`` or ``(x, ...)``) under ``torch.no_grad``
        with the hooks attached and a tqdm progress bar (rank 0 only). Resumes after the
        ``self.samples`` samples already seen (e.g. restored with :meth:`load_state_dict`): those
        are skipped. A :class:`pyadvk.distributed.ShardSampler` sets ``sample_index``."""
        from tqdm.auto import tqdm

        if isinstance(loader, torch.utils.data.DataLoader):
            distributed.check_loader(loader)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, distributed.ShardSampler) and not sampler.shuffle:
            self.sample_index = (sampler.rank, sampler.world)
            self.sample_index_given = True
        if device is None:
            p = next(iter(self.model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        try:
            total = len(sampler) if sampler is not None else len(loader.dataset)
        except (TypeError, AttributeError):
            total = None
        if max_samples is not None and total is not None:
            total = min(total, max_samples)
        skip = self.samples
        bar = tqdm(
            total=total,
            initial=min(skip, total or skip),
            unit="img",
            desc="neuron stats",
            leave=False,
            disable=not progress or not distributed.is_main(),
        )
        was_training = self.model.training
        self.model.eval()
        seen = 0
        try:
            with self, torch.no_grad():
                for batch in loader:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    n = x.shape[0]
                    if seen + n <= skip:  # already counted before an interruption
                        seen += n
                        continue
                    if seen < skip:
                        x = x[skip - seen :]
                        seen = skip
                    if max_samples is not None:
                        x = x[: max(0, max_samples - seen)]
                        if x.shape[0] == 0:
                            break
                    self.model(x.to(device))
                    seen += x.shape[0]
                    bar.update(x.shape[0])
        finally:
            bar.close()
            self.model.train(was_training)
        return self

    # -----------------------------------------------------------------------------------------
    # Results.

    def _global_samples(self, sample: torch.Tensor) -> torch.Tensor:
        start, step = self.sample_index
        return torch.where(sample >= 0, start + step * sample, -1)

    def results(self) -> dict[str, dict]:
        """Per layer: a dict of per-channel tensors (CPU): ``count``, ``nan_count``, ``mean``,
        ``std`` (population), ``min``, ``max``, ``topk_values`` (C, k), ``topk_indices`` (dataset
        indices, -1 where fewer than k values were seen), ``topk_positions`` (flat spatial
        position) and ``topk_coords`` (C, k, len(spatial)), ``threshold`` and
        ``threshold_exact``, ``histogram`` (C, bins), ``underflow``, ``overflow``,
        ``histogram_moved`` (C,: 0, or after merging shards with different histogram ranges a
        bound on the values whose bin may differ from one pass's on this grid), plus
        ``histogram_range``, ``spatial_shape``, ``quantile``."""
        out = {}
        for name in self.layers:
            state = self.states[name]
            if state is None:
                out[name] = None
                continue
            s = state.to("cpu")
            threshold, exact = cs.quantile_threshold(s, self.quantile)
            shape = self.spatial_shapes[name] or ()
            pos = s.topk_pos
            coords = []
            rest = pos.clone()
            for size in reversed(shape):
                coords.append(torch.where(pos >= 0, rest % size, -1))
                rest = rest // size
            coords = torch.stack(coords[::-1], -1) if coords else pos.new_zeros(pos.shape + (0,))
            out[name] = {
                "count": s.count,
                "nan_count": s.nan_count,
                "mean": s.mean,
                "std": s.variance().sqrt(),
                "min": s.minimum,
                "max": s.maximum,
                "topk_values": s.topk_values,
                "topk_indices": self._global_samples(s.topk_sample),
                "topk_positions": s.topk_pos,
                "topk_coords": coords,
                "threshold": threshold,
                "threshold_exact": exact,
                "histogram": s.hist[:, 1:-1],
                "underflow": s.hist[:, 0],
                "overflow": s.hist[:, -1],
                "histogram_moved": s.hist_moved,
                "histogram_range": (s.lo, s.hi),
                "spatial_shape": tuple(shape),
                "quantile": self.quantile,
            }
        return out

    def summary(self) -> dict:
        """:meth:`results` as plain JSON-able lists."""

        def plain(v):
            if isinstance(v, torch.Tensor):
                return (
                    [None if (isinstance(x, float) and not math.isfinite(x)) else x for x in v.tolist()]
                    if v.dim() == 1
                    else [plain(r) for r in v]
                )
            return v

        out = {"samples": self.samples, "quantile": self.quantile, "layers": {}}
        for name, r in self.results().items():
            out["layers"][name] = None if r is None else {k: plain(v) for k, v in r.items()}
        return out

    def save_json(self, path: str | os.PathLike) -> None:
        """Writes :meth:`summary` atomically."""
        save_json(self.summary(), path)

    # -----------------------------------------------------------------------------------------
    # Checkpoints and shards.

    def _config(self) -> dict:
        return {
            "layers": list(self.layers),
            "topk": self.topk,
            "quantile": self.quantile,
            "histogram_bins": self.histogram_bins,
            "histogram_range": self.histogram_range,
            "num_samples": self.num_samples,
            "quantile_buffer": self.quantile_buffer,
        }

    def state_dict(self) -> dict:
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

    def load_state_dict(self, sd: dict, *, check_world_size: bool = True) -> None:
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

    def _check_config(self, config: dict, what: str) -> None:
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

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`state_dict` atomically (torch.save)."""
        save_torch(self.state_dict(), path)

    def load(self, path: str | os.PathLike, **kwargs) -> None:
        """Restores a file written by :meth:`save` (its zip archive checked first: a damaged file
        raises :class:`pyadvk._io.CorruptFileError`)."""
        check_archive(path, "statistics file")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), **kwargs)

    def _end_index(self) -> int:
        """One past the largest dataset index of the samples seen (0 before any)."""
        start, step = self.sample_index
        return start + step * (self.samples - 1) + 1 if self.samples else 0

    def _set_merged(self, states: dict, samples: int) -> None:
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

    def merge(self, other: NeuronStats) -> NeuronStats:
        """Combines another shard's statistics into this object (in place; returns self): the
        result equals one pass over both shards' data (the histogram re-binned when the ranges
        differ; see the module docstring). Sample indices are mapped to dataset indices first,
        after which ``sample_index`` is (0, 1); a shard without a ``sample_index`` of its own is
        numbered after this one's samples (two halves of a dataset tracked one after the other
        merge like one pass in dataset order)."""
        if not isinstance(other, NeuronStats):
            raise TypeError(f"other must be a NeuronStats, got {type(other).__name__}")
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

    def sync(self) -> NeuronStats:
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
        gathered: list = [None] * distributed.world_size()
        dist.all_gather_object(gathered, payload)
        merged: dict = {name: None for name in self.layers}
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


def _globalized(states: dict, sample_index: tuple[int, int]) -> dict[str, cs.ChannelStats | None]:
    """CPU copies of ``states`` with top-k sample indices mapped to dataset indices start + step·i."""
    start, step = sample_index
    out: dict[str, cs.ChannelStats | None] = {}
    for name, s in states.items():
        g = None if s is None else s.to("cpu")
        if g is not None:
            g.topk_sample = torch.where(g.topk_sample >= 0, start + step * g.topk_sample, -1)
        out[name] = g
    return out


# ---------------------------------------------------------------------------------------------
# Pictures.


def select_channels(stats: NeuronStats | dict, layer: str, k: int) -> list[int]:
    """The ``k`` channels of ``layer`` to look at first: those that fire, most selective first.

    A channel fires when its largest activation is > 0 and its values vary (std > 0): dead
    channels (a ReLU that never opens, a constant output) are left out, so fewer than ``k`` may
    come back. Selectivity is how far the channel's top activations stand out of its usual values:
    ``(mean of its top-k values - mean) / std``, the z-score of its strongest responses (a channel
    that responds strongly to a few images ranks above one that is always on). Ties go to the
    smaller channel index."""
    results = stats.results() if isinstance(stats, NeuronStats) else stats
    if layer not in results or results[layer] is None:
        raise ValueError(f"layer {layer!r} has no statistics; layers: {', '.join(n for n, v in results.items() if v)}")
    k = _checks.integer("k", k, low=1)
    r = results[layer]
    top = r["topk_values"].double()
    filled = r["topk_indices"] >= 0
    top_mean = torch.where(filled, top, 0.0).sum(1) / filled.sum(1).clamp(min=1)
    std = r["std"].double()
    fires = (r["max"] > 0) & (std > 0) & torch.isfinite(std) & filled[:, 0]
    score = torch.where(fires, (top_mean - r["mean"].double()) / torch.where(fires, std, 1.0), -math.inf)
    order = sorted(range(score.numel()), key=lambda c: (-float(score[c]), c))
    return [c for c in order if bool(fires[c])][:k]


def receptive_field_box(
    model: nn.Module, layer: str, image: torch.Tensor, channel: int, coords: Sequence[int]
) -> tuple[int, int, int, int] | None:
    """The input pixels that the activation ``layer[channel, *coords]`` of ``image`` (C, H, W)
    depends on, as a box (top, left, bottom, right), bottom/right exclusive: the support of the
    gradient of that activation with respect to the image (its effective receptive field on this
    image, which the layer path bounds from above). None when the gradient is zero everywhere
    (e.g. a saturated unit) or the layer has no spatial grid."""
    module = dict(distributed.unwrap(model).named_modules())[layer]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, (tuple, list)) else o))
    x = image[None].detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(x)
            out = captured[0]
            if out.dim() < 3 or len(coords) != out.dim() - 2:
                return None
            (grad,) = torch.autograd.grad(out[(0, channel, *coords)], x)
    finally:
        handle.remove()
        model.train(was_training)
    support = grad[0].abs().sum(0) > 0
    if support.dim() != 2 or not bool(support.any()):
        return None
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def plot_top_patches(
    stats: NeuronStats | dict,
    dataset,
    layer: str,
    channels: Sequence[int],
    path: str | os.PathLike,
    *,
    receptive_field: int | None = None,
    k: int | None = None,
    model: nn.Module | None = None,
) -> list[str]:
    """For each channel of ``channels`` in ``layer``, writes ``path/<layer>_ch<c>.png``: a grid of
    the image patches of its top-k activations (best first), titled with value and dataset index.

    ``dataset[i][0]`` (or ``dataset[i]``) must be the (C, H, W) image in [0, 1] of dataset index i.
    With ``model`` (and no ``receptive_field``), a patch is the activation's receptive field on
    that image (:func:`receptive_field_box`) with a margin of a quarter of its size for context,
    the field outlined in red. With ``receptive_field``, it is the ``receptive_field`` squared
    pixels centred on the image point under the activation's spatial position (the layer's grid
    stretched over the image), outlined the same way. Otherwise the whole image. Choose the
    channels with :func:`select_channels`. Returns the paths written (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    results = stats.results() if isinstance(stats, NeuronStats) else stats
    if layer not in results or results[layer] is None:
        raise ValueError(f"layer {layer!r} has no statistics; layers: {', '.join(k for k, v in results.items() if v)}")
    r = results[layer]
    n_channels = r["topk_values"].shape[0]
    if receptive_field is not None:
        receptive_field = _checks.integer("receptive_field", receptive_field, low=1)
    paths = []
    for c in channels:
        if not isinstance(c, int) or not 0 <= c < n_channels:
            raise ValueError(f"channels: {c!r} is not a channel of layer {layer!r} (0..{n_channels - 1})")
    for c in channels:
        idx = r["topk_indices"][c].tolist()
        vals = r["topk_values"][c].tolist()
        coords = r["topk_coords"][c].tolist()
        entries = [(i, v, co) for i, v, co in zip(idx, vals, coords) if i >= 0][: k or len(idx)]
        cols = max(1, min(8, len(entries)))
        rows = max(1, math.ceil(len(entries) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (i, v, co) in zip(axes.flat, entries):
            item = dataset[i]
            img = item[0] if isinstance(item, (tuple, list)) else item
            img = img.detach().float().cpu()
            img = img[None] if img.dim() == 2 else img
            box = None
            if receptive_field is not None:
                box = _square_box(img, co, r["spatial_shape"], receptive_field)
            elif model is not None:
                device = next(iter(model.parameters()), img).device
                box = receptive_field_box(model, layer, img.to(device), c, co)
            patch, field = _crop(img, box)
            if patch.shape[0] == 1:
                ax.imshow(patch[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(patch[:3].permute(1, 2, 0).clamp(0, 1).numpy())
            if field is not None:
                top, left, bottom, right = field
                ax.add_patch(
                    Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, ec="red", lw=1.2)
                )
            ax.set_title(f"{v:.3g} #{i}", fontsize=7)
        fig.suptitle(f"{layer} channel {c}: top {len(entries)}", fontsize=8)
        out = os.path.join(os.fspath(path), f"{layer.replace('.', '_')}_ch{c}.png")
        save_figure(fig, out, dpi=100)
        paths.append(out)
    return paths


def _square_box(
    img: torch.Tensor, coords: list[int], spatial: tuple[int, ...], size: int
) -> tuple[int, int, int, int] | None:
    """The ``size``-pixel square centred on the image point under a position of the layer's grid
    (the grid stretched over the image), clipped to the image; None without a 2-d grid."""
    if len(spatial) != 2:
        return None
    h, w = img.shape[-2:]
    cy = int((coords[0] + 0.5) * h / spatial[0])
    cx = int((coords[1] + 0.5) * w / spatial[1])
    half = size // 2
    return max(0, cy - half), max(0, cx - half), min(h, cy - half + size), min(w, cx - half + size)


def _crop(img: torch.Tensor, box: tuple[int, int, int, int] | None):
    """The box with a margin of a quarter of its size (clipped to the image), and the box in the
    crop's coordinates; the whole image and None without a box."""
    if box is None:
        return img, None
    h, w = img.shape[-2:]
    top, left, bottom, right = box
    my, mx = max(1, (bottom - top) // 4), max(1, (right - left) // 4)
    y0, x0, y1, x1 = max(0, top - my), max(0, left - mx), min(h, bottom + my), min(w, right + mx)
    return img[:, y0:y1, x0:x1], (top - y0, left - x0, bottom - y0, right - x0)
