"""HalfHuberReLU forward + backward: every body vs the composite torch expression (a torch.where
chain under autograd) vs torch.compile of that expression, at ResNet activation sizes; and the
bytes each keeps for the backward pass.

Run: ``pyadvk bench --ops half_huber`` (or ``pytest benchmarks/bench_half_huber.py
--benchmark-json=out.json``, then ``python benchmarks/summarize.py out.json``). One timed call is ``y = f(x)`` then
``dx = autograd.grad(y, x, dy)``. ``extra_info`` carries:

* ``gbps``: effective bandwidth for the minimum traffic of forward + backward, 5 values per element
  (forward reads x and writes y; backward reads dy and x and writes dx);
* ``saved_bytes``: the bytes autograd keeps between forward and backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages, so x counted once); the fused
  ops save x only;
* ``peak_bytes`` (CUDA only): peak allocated memory during one forward + backward above what was
  allocated before it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import DEVICE, impls, record, run_benchmark, sizes, sync
from pyadvk.ops import half_huber as hh

SIZES = {
    "resnet-128x64x32x32": (128, 64, 32, 32),
    "resnet-128x128x16x16": (128, 128, 16, 16),
    "resnet-128x256x8x8": (128, 256, 8, 8),
    "resnet-32x64x32x32": (32, 64, 32, 32),
}
IMPLS = ["composite", "compile", "torch", "cpp", "triton", "cuda"]
DELTA = 0.5


def composite(x: torch.Tensor, delta: float = DELTA) -> torch.Tensor:
    """The Half-Huber ReLU as plain torch ops, as a model would write it without pyadvk."""
    return torch.where(x < 0, torch.zeros_like(x), torch.where(x <= delta, x * x / (2 * delta), x - delta / 2))


@functools.cache
def compiled_composite():
    return torch.compile(composite, dynamic=False)


def make_fn(impl: str):
    if impl == "composite":
        return composite
    if impl == "compile":
        return compiled_composite()
    return lambda x: hh.half_huber_relu(x, DELTA, backend=impl)


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of ``fn(x)``."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(storages.values())


def peak_bytes(step) -> int | None:
    if DEVICE.type != "cuda":
        return None
    sync()
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    step()
    sync()
    return torch.cuda.max_memory_allocated(DEVICE) - base


@pytest.mark.parametrize("impl", impls(IMPLS))
@pytest.mark.parametrize("size", sizes(SIZES))
def test_half_huber_fwd_bwd(benchmark, size, impl):
    if impl not in ("composite", "compile"):
        why = hh.HALF_HUBER.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    shape = SIZES[size]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen).requires_grad_(True)
    dy = torch.randn(shape, device=DEVICE, generator=gen)
    fn = make_fn(impl)

    def run():
        y = fn(x)
        torch.autograd.grad(y, x, dy)

    times = run_benchmark(benchmark, run, max_rounds=100)
    numel = torch.Size(shape).numel()
    saved = saved_bytes(fn, x)
    record(
        benchmark,
        times,
        op="half_huber_relu",
        case="fwd+bwd",
        size=size,
        shape=shape,
        impl=impl,
        bytes_moved=5 * 4 * numel,
        peak_bytes=peak_bytes(run),
        saved_bytes=saved,
        note_saved_for_backward=f"{saved / 2**20:.1f} MiB",
    )
