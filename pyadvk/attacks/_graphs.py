"""CUDA graphs for the attacks' ``cuda_graph=True`` mode: capture on the images' device, and keep
the captured iterations between calls.

An attack keeps a :class:`GraphCache`: one entry per (shape, dtype, memory layout, device, model,
settings), holding the captured graph(s) and the static tensors they read and write. The first
call with a new key warms up eagerly on a side stream of the images' device and captures (a
device sync, a fresh memory pool); a later call with the same key copies its inputs into the
static tensors and replays, with no capture, no warm-up on a side stream, no ``empty_cache``.

The model is part of the key through :func:`model_key`: its identity, the storage of every
parameter and buffer (a graph reads them at the addresses it was captured with, so a parameter
replaced by ``model.to(...)`` or ``param.data = ...`` means a new capture, while in-place updates
such as ``optimizer.step()`` or ``load_state_dict`` are read by the replays) and every
submodule's train/eval flag. Each entry holds its memory pool (the activations of one step) until
it is evicted (after :data:`GRAPH_CACHE_SIZE` newer keys), :meth:`GraphCache.clear` is called
(the attacks' ``release_graphs()``) or the attack is deleted.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

GRAPH_CACHE_SIZE = 4  # keys kept per attack: full batches, the last partial batch, a few more


def model_key(model: object) -> Hashable:
    """What a captured graph of ``model`` depends on: its identity, the storage address, shape
    and dtype of each parameter and buffer, and each submodule's ``training`` flag. Reads no
    tensor data (no device sync)."""
    if not isinstance(model, nn.Module):
        return ("callable", id(model))
    tensors = tuple(
        (t.data_ptr(), tuple(t.shape), t.dtype) for t in (*model.parameters(), *model.buffers()) if t is not None
    )
    return ("module", id(model), tensors, tuple(m.training for m in model.modules()))


def tensor_key(t: torch.Tensor | None) -> Hashable:
    """Shape, strides (the memory layout), dtype and device of ``t``: what a graph that reads a
    static copy of it depends on (not its values, which are copied in before each replay)."""
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def check_device(images: torch.Tensor) -> None:
    """``cuda_graph=True`` needs CUDA images."""
    if images.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA images, got images on {images.device}")


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """``device`` current for the block (streams, capture and replay then use it)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        yield


def capture(
    device: torch.device, body: Callable[[], None], warmup: Callable[[], None] | None = None, pool: Any = None
) -> Any:
    """Runs ``warmup()`` eagerly on a side stream of ``device`` (as capture requires: lazy
    initialization and workspace allocation happen outside the graph), then captures ``body()``
    on that stream as a CUDA graph on ``device`` (its kernels are recorded, not run) and returns
    the graph, whose ``replay()`` runs them. ``pool``: another graph's ``pool()`` to share (graphs
    that never replay at the same time). Call it under :func:`on_device` (``device`` current)."""
    side = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    if warmup is not None:
        with torch.cuda.stream(side):
            warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        body()
    current.wait_stream(side)
    return graph


class GraphCache:
    """Captured iterations by key, the least recently used dropped beyond ``size`` entries."""

    def __init__(self, size: int = GRAPH_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        """The entry for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Any) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drops every entry: the graphs and their memory pools are freed once nothing else holds them."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"GraphCache({len(self)} of {self.size})"

    def __deepcopy__(self, memo: dict) -> GraphCache:
        return GraphCache(self.size)  # graphs are bound to their tensors: a copy captures its own
