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

Files: this module holds the hooks, tracking and results; :class:`NeuronStats` takes its
persistence (state dicts, files) from ``_persistence.py`` and :meth:`merge` / :meth:`sync` from
``_sharding.py``, both built on ``_base.py`` (the attributes, the configuration and the checks they
share); the pictures are in ``pictures.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pyadvk import _checks, distributed
from pyadvk._io import save_json
from pyadvk.ops import channel_stats as cs
from pyadvk.stats._base import HistogramRange, _check_range
from pyadvk.stats._persistence import Persistence
from pyadvk.stats._sharding import Sharding

DEFAULT_QUANTILE_BUFFER = 4096


def default_range(a: torch.Tensor, bins: int) -> tuple[float, float]:
    """The histogram range chosen from a layer's first batch: its finite [min, max] widened by a
    quarter of the span on each side (later batches mostly fall inside), then the dyadic grid
    that covers it (:func:`pyadvk.ops.channel_stats.dyadic_range`), so that shards which chose
    their ranges from their own first batches merge with no value moved across a bin edge."""
    finite = a.float()[torch.isfinite(a.float())]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = hi - lo if hi > lo else max(1.0, abs(lo))
    return cs.dyadic_range(lo - span / 4, hi + span / 4, bins)


class NeuronStats(Persistence, Sharding):
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
        histogram_range: HistogramRange | None = None,
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
        self.states = {name: None for name in layers}
        self.spatial_shapes = {name: None for name in layers}
        self.samples = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._batch = None
        self._pending = []

    # -----------------------------------------------------------------------------------------
    # Hooks.

    def __enter__(self) -> NeuronStats:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
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
        """Removes the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            self.update(name, output.detach())

        return hook

    def _advance(self, module: nn.Module | None, inputs: Any, output: Any) -> None:
        batch = self._batch
        self._batch = None
        self._pending = []
        if batch is not None:
            self.samples += batch

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
        loader: Iterable[Any],
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
        sized: Any = sampler if sampler is not None else getattr(loader, "dataset", None)  # may have no len()
        try:
            total = len(sized)
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

    def results(self) -> dict[str, dict[str, Any] | None]:
        """Per layer: a dict of per-channel tensors (CPU): ``count``, ``nan_count``, ``mean``,
        ``std`` (population), ``min``, ``max``, ``topk_values`` (C, k), ``topk_indices`` (dataset
        indices, -1 where fewer than k values were seen), ``topk_positions`` (flat spatial
        position) and ``topk_coords`` (C, k, len(spatial)), ``threshold`` and
        ``threshold_exact``, ``histogram`` (C, bins), ``underflow``, ``overflow``,
        ``histogram_moved`` (C,: 0, or after merging shards with different histogram ranges a
        bound on the values whose bin may differ from one pass's on this grid), plus
        ``histogram_range``, ``spatial_shape``, ``quantile``; None for a layer that has seen no
        batch yet."""
        out: dict[str, dict[str, Any] | None] = {}
        for name in self.layers:
            state = self.states[name]
            if state is None:
                out[name] = None
                continue
            s = state.to("cpu")
            threshold, exact = cs.quantile_threshold(s, self.quantile)
            shape = self.spatial_shapes[name] or ()
            pos = s.topk_pos
            per_dim = []
            rest = pos.clone()
            for size in reversed(shape):
                per_dim.append(torch.where(pos >= 0, rest % size, -1))
                rest = rest // size
            coords = torch.stack(per_dim[::-1], -1) if per_dim else pos.new_zeros(pos.shape + (0,))
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

    def summary(self) -> dict[str, Any]:
        """:meth:`results` as plain JSON-able lists."""

        def plain(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return (
                    [None if (isinstance(x, float) and not math.isfinite(x)) else x for x in v.tolist()]
                    if v.dim() == 1
                    else [plain(r) for r in v]
                )
            return v

        results = self.results()
        layers = {name: None if r is None else {k: plain(v) for k, v in r.items()} for name, r in results.items()}
        return {"samples": self.samples, "quantile": self.quantile, "layers": layers}

    def save_json(self, path: str | os.PathLike) -> None:
        """Writes :meth:`summary` atomically."""
        save_json(self.summary(), path)
