"""pgd_step (linf, l2): every body vs the unfused op chain torchattacks runs (re-implemented in
benchmarks/baselines.py) vs torch.compile of the torch body, from a CIFAR batch to an ImageNet batch.

Run: ``pyadvk bench --ops pgd_step`` (or ``pytest benchmarks/bench_pgd_step.py
--benchmark-json=out.json``, then ``python benchmarks/summarize.py out.json``). Every row carries
the effective bandwidth (the op's floor, 3 reads + 1 write per value; the l2 bodies read x_adv, x_orig
and the gradient a second time, 7 reads + 1 write) and its share of the copy bandwidth
measured in the same run.
Inputs rotate over enough buffers (>= 256 MiB) that caches do not flatter the small sizes.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import baselines
from benchmarks.conftest import DEVICE, impls, record, run_benchmark, sizes
from pyadvk.ops import pgd as pgd_ops

SIZES = {
    "cifar-128": (128, 3, 32, 32),
    "cifar-512": (512, 3, 32, 32),
    "imagenet-32": (32, 3, 224, 224),
    "imagenet-256": (256, 3, 224, 224),
}
IMPLS = ["unfused", "compile", "torch", "cpp", "triton", "cuda"]
EPS = {"linf": 8 / 255, "l2": 0.5}
ALPHA = {"linf": 2 / 255, "l2": 0.1}


def rotating_inputs(shape, dtype=torch.float32, total_bytes=256 * 2**20):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    numel = torch.Size(shape).numel()
    sets = max(1, min(32, total_bytes // (3 * 4 * numel)))
    out = []
    for _ in range(sets):
        x_orig = torch.rand(shape, device=DEVICE, generator=gen, dtype=dtype)
        x_adv = (x_orig + 0.01 * torch.randn(shape, device=DEVICE, generator=gen)).clamp(0, 1)
        out.append((x_adv, x_orig, torch.randn(shape, device=DEVICE, generator=gen, dtype=dtype)))
    return out


@functools.cache
def compiled_reference(norm: str):
    return torch.compile(pgd_ops._STEP_REFERENCE[norm], dynamic=False)


def make_step(impl: str, norm: str):
    eps, alpha = EPS[norm], ALPHA[norm]
    if impl == "unfused":
        chain = baselines.torchattacks_linf_step if norm == "linf" else baselines.torchattacks_l2_step
        return lambda xa, xo, g: chain(xa, xo, g, eps, alpha)
    if impl == "compile":
        fn = compiled_reference(norm)
        return lambda xa, xo, g: fn(xa, xo, g, eps, alpha, None, None, 0.0, 1.0)
    return lambda xa, xo, g: pgd_ops.pgd_step_(xa, xo, g, eps=eps, alpha=alpha, norm=norm, backend=impl)


@pytest.mark.parametrize("impl", impls(IMPLS))
@pytest.mark.parametrize("size", sizes(SIZES))
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_pgd_step(benchmark, size, norm, impl):
    if impl not in ("unfused", "compile"):
        why = pgd_ops.STEP.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    shape = SIZES[size]
    inputs = rotating_inputs(shape)
    step = make_step(impl, norm)
    state = {"i": 0}

    def run():
        xa, xo, g = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        step(xa, xo, g)

    times = run_benchmark(benchmark, run)
    numel = torch.Size(shape).numel()
    record(
        benchmark,
        times,
        op="pgd_step",
        case=norm,
        size=size,
        shape=shape,
        impl=impl,
        bytes_moved=4 * 4 * numel,
        norm=norm,
    )  # 3 reads + 1 write of float32
