"""boundary_projection (l2, linf) on the rows FAB projects: every body vs the torch reference body
(the chain of torch ops FAB ran before the op existed: a sort of the breakpoints, two cumulative
sums, a gather) and torch.compile of it, from a digits batch to an ImageNet batch.

Run: ``pyadvk bench --ops boundary_projection`` (or ``pytest benchmarks/bench_boundary_projection.py
--benchmark-json=out.json``, then ``python benchmarks/summarize.py out.json``). Rows are FAB's: 2B
rows per step (the iterate and the original image, B images), x in [0, 1] with 5% of the values on
a face, w a Gaussian normal, b placing the hyperplane at r = 0.2·D·N(0, 1), where the box is active
for many coordinates and missed by about one row in twenty. The bandwidth counts one read of x and w
and one write of δ (the op's floor); the cpp, cuda and triton bodies read the row once per probe of their bisection
(typically 10-25), from cache where a row fits.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import DEVICE, impls, record, run_benchmark, sizes
from pyadvk.ops.boundary_projection import BOUNDARY_PROJECTION, boundary_projection, boundary_projection_reference

SIZES = {
    "digits-90": (90, 64),  # FAB on 45 8×8 digits
    "cifar-90": (90, 3072),  # 45 CIFAR images
    "imagenet-9": (9, 150528),  # 4-5 ImageNet images at 224×224
}
IMPLS = ["unfused", "compile", "cpp", "triton", "cuda"]
NORMS = ("l2", "linf")


def rotating_rows(shape, total_bytes=64 * 2**20):
    """Sets of (x, w, b) rows, enough (>= 64 MiB) that caches do not flatter the small sizes."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows, dims = shape
    sets = max(1, min(16, total_bytes // (3 * 4 * rows * dims)))
    out = []
    for _ in range(sets):
        x = torch.rand(shape, device=DEVICE, generator=gen)
        x = torch.where(torch.rand(shape, device=DEVICE, generator=gen) < 0.05, x.round(), x)
        w = torch.randn(shape, device=DEVICE, generator=gen)
        b = torch.randn(rows, device=DEVICE, generator=gen) * 0.2 * dims - (w * x).sum(dim=1)
        out.append((x, w, b))
    return out


@functools.cache
def compiled_reference():
    return torch.compile(boundary_projection_reference, dynamic=False)


def make_call(impl: str, norm: str):
    if impl == "unfused":
        return lambda x, w, b: boundary_projection_reference(x, w, b, 0.0, 1.0, norm)
    if impl == "compile":
        fn = compiled_reference()
        return lambda x, w, b: fn(x, w, b, 0.0, 1.0, norm)
    return lambda x, w, b: boundary_projection(x, w, b, 0.0, 1.0, norm, backend=impl)


@pytest.mark.parametrize("impl", impls(IMPLS))
@pytest.mark.parametrize("size", sizes(SIZES))
@pytest.mark.parametrize("norm", NORMS)
def test_boundary_projection(benchmark, size, norm, impl):
    if impl not in ("unfused", "compile"):
        why = BOUNDARY_PROJECTION.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    shape = SIZES[size]
    inputs = rotating_rows(shape)
    call = make_call(impl, norm)
    state = {"i": 0}

    def run():
        x, w, b = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        call(x, w, b)

    times = run_benchmark(benchmark, run)
    record(
        benchmark,
        times,
        op="boundary_projection",
        case=norm,
        size=size,
        shape=shape,
        impl=impl,
        bytes_moved=3 * 4 * shape[0] * shape[1],  # read x and w, write δ (float32)
        norm=norm,
    )
