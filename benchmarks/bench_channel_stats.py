"""channel_stats_update: every body vs the same statistics as an unfused chain of PyTorch ops
(Welford/Chan moments from torch.var_mean, amin/amax, a bucketize + scatter_add histogram,
torch.topk merges of the top-k and the quantile buffer), on streams of activations.

Run: ``pyadvk bench --ops channel_stats`` (or ``pytest benchmarks/bench_channel_stats.py
--benchmark-json=out.json``, then ``python benchmarks/summarize.py out.json``). Every row carries
the effective bandwidth (the activations read once, float32) and its share of the copy bandwidth
measured in the same run, and the size of the state (independent of the stream's length). The
``case`` field holds the quantile-buffer setting.
The timed rounds are the first batches of a stream, when the top-k and quantile heaps still take
many values; later in a pass fewer values beat the heaps' roots.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.conftest import DEVICE, impls, record, run_benchmark, sizes
from pyadvk.ops import channel_stats as cs

# (N, C, *spatial): ResNet-18 layer3 at CIFAR size (batch 256), layer1, and a linear layer
SIZES = {
    "layer3-cifar-256": (256, 256, 8, 8),
    "layer1-cifar-64": (64, 64, 32, 32),
    "linear-4096x512": (4096, 512),
}
IMPLS = ["unfused", "torch", "cpp", "triton", "cuda"]
TOPK, BINS, Q, DATASET = 16, 64, 0.005, 10_000


def rotating_inputs(shape, total_bytes=256 * 2**20):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    numel = math.prod(shape)
    sets = max(1, min(8, total_bytes // (4 * numel)))
    return [torch.randn(shape, device=DEVICE, generator=gen).relu_() for _ in range(sets)]


BUFFERS = {"exact-10k": DATASET, "none": 0}


def new_state(shape, buffer: str):
    """A state with top-16, 64 bins and, for "exact-10k", the quantile buffer that makes the
    q = 0.005 threshold exact over a dataset of 10,000 samples (none: no buffer)."""
    spatial = math.prod(shape[2:])
    m = cs.quantile_capacity(Q, BUFFERS[buffer] * spatial) if BUFFERS[buffer] else 0
    return cs.ChannelStats.create(shape[1], topk=TOPK, bins=BINS, lo=0.0, hi=4.0, quantile_capacity=m, device=DEVICE)


def unfused_update(st: cs.ChannelStats, x: torch.Tensor, offset: int) -> None:
    """The same statistics (no NaN handling, no tie rule) as separate PyTorch ops."""
    c = x.shape[1]
    spatial = math.prod(x.shape[2:])
    v = x.float().reshape(x.shape[0], c, -1).transpose(0, 1).reshape(c, -1)
    var, mean = torch.var_mean(v.double(), dim=1, unbiased=False)
    n = torch.full_like(st.count, v.shape[1])
    count, m, m2 = cs.chan_merge(st.count, st.mean, st.m2, n, mean, var * v.shape[1])
    st.count.copy_(count), st.mean.copy_(m), st.m2.copy_(m2)
    torch.minimum(st.minimum, v.amin(1), out=st.minimum)
    torch.maximum(st.maximum, v.amax(1), out=st.maximum)
    edges = torch.linspace(st.lo, st.hi, st.bins + 1, device=v.device)
    cols = torch.bucketize(v, edges) + torch.arange(c, device=v.device)[:, None] * (st.bins + 2)
    st.hist.view(-1).add_(torch.bincount(cols.view(-1), minlength=c * (st.bins + 2)))
    keys = offset * spatial + torch.arange(v.shape[1], device=v.device)
    top = torch.topk(torch.cat([st.topk_values, v], 1), st.topk, dim=1)
    old_keys = st.topk_sample * spatial + st.topk_pos
    k = torch.cat([old_keys, keys.expand(c, -1)], 1).gather(1, top.indices)
    st.topk_values.copy_(top.values), st.topk_sample.copy_(k // spatial), st.topk_pos.copy_(k % spatial)
    if st.quantile_capacity:
        st.qbuf.copy_(torch.topk(torch.cat([st.qbuf, v], 1), st.quantile_capacity, dim=1).values)


def make_update(impl: str):
    if impl == "unfused":
        return unfused_update
    return lambda st, x, offset: cs.channel_stats_update(st, x, offset, backend=impl)


@pytest.mark.parametrize("impl", impls(IMPLS))
@pytest.mark.parametrize("buffer", list(BUFFERS))
@pytest.mark.parametrize("size", sizes(SIZES))
def test_channel_stats(benchmark, size, impl, buffer):
    if impl != "unfused":
        why = cs.UPDATE.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    shape = SIZES[size]
    inputs = rotating_inputs(shape)
    update = make_update(impl)
    state = new_state(shape, buffer)
    counter = {"i": 0}

    def run():
        i = counter["i"]
        counter["i"] += 1
        update(state, inputs[i % len(inputs)], i * shape[0])

    times = run_benchmark(benchmark, run, min_rounds=3, max_rounds=50)
    numel = math.prod(shape)
    state_bytes = sum(t.numel() * t.element_size() for t in state.tensors())
    record(
        benchmark,
        times,
        op="channel_stats_update",
        case=f"qbuf {buffer}",
        size=size,
        shape=shape,
        impl=impl,
        bytes_moved=4 * numel,
        state_mib=state_bytes / 2**20,
        quantile_capacity=state.quantile_capacity,
        note_state=f"{state_bytes / 2**20:.2f} MiB",
    )
