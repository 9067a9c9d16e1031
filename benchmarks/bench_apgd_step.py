"""apgd_step (linf, l2), in place with per-image eta as APGD runs it: every body vs the unfused op
chain of the published update written with plain torch ops vs torch.compile of the torch body, from
a CIFAR batch to an ImageNet batch.

Run: ``pyadvk bench --ops apgd_step`` (or ``pytest benchmarks/bench_apgd_step.py
--benchmark-json=out.json``, then ``python benchmarks/summarize.py out.json``). Every row carries
the effective bandwidth, counted as the data the step must touch (4 reads + 1 write per value, as
linf does; the l2 bodies read the inputs three times, from cache where a sample fits), and its
share of the copy bandwidth measured in the same run. Inputs rotate over enough buffers
(>= 256 MiB) that caches do not flatter the small sizes.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import DEVICE, impls, record, run_benchmark, sizes
from pyadvk.ops import apgd as apgd_ops
from pyadvk.ops.pgd import NORMS

SIZES = {
    "cifar-128": (128, 3, 32, 32),
    "cifar-512": (512, 3, 32, 32),
    "imagenet-32": (32, 3, 224, 224),
}
IMPLS = ["unfused", "compile", "torch", "cpp", "triton", "cuda"]
EPS = {"linf": 8 / 255, "l2": 0.5}
MOMENTUM = 0.75


def unfused_step(norm, x, x_prev, x_orig, grad, eta, eps, lower=0.0, upper=1.0):
    """The update z = P(x + eta s(g)), y = P(x + a(z - x) + (1 - a)(x - x_prev)) as a chain of
    plain torch ops (per-image eta of shape (B,), float32 norms), one kernel per op."""
    view = (-1,) + (1,) * (x.dim() - 1)
    h = eta.view(view)
    if norm == "linf":
        z = torch.clamp(torch.min(torch.max(x + h * grad.sign(), x_orig - eps), x_orig + eps), lower, upper)
        w = x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev)
        return torch.clamp(torch.min(torch.max(w, x_orig - eps), x_orig + eps), lower, upper)

    def project(v):
        d = v - x_orig
        factor = torch.clamp(eps / d.flatten(1).norm(dim=1).clamp_min(1e-12), max=1.0)
        return torch.clamp(x_orig + d * factor.view(view), lower, upper)

    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
    z = project(x + h * grad / gn)
    return project(x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev))


def rotating_inputs(shape, dtype=torch.float32, total_bytes=256 * 2**20):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    numel = torch.Size(shape).numel()
    sets = max(1, min(32, total_bytes // (4 * 4 * numel)))
    out = []
    for _ in range(sets):
        x_orig = torch.rand(shape, device=DEVICE, generator=gen, dtype=dtype)
        x = (x_orig + 0.01 * torch.randn(shape, device=DEVICE, generator=gen)).clamp(0, 1)
        x_prev = (x_orig + 0.01 * torch.randn(shape, device=DEVICE, generator=gen)).clamp(0, 1)
        out.append((x, x_prev, x_orig, torch.randn(shape, device=DEVICE, generator=gen, dtype=dtype)))
    return out


@functools.cache
def compiled_reference():
    return torch.compile(apgd_ops.apgd_step_reference, dynamic=False)


def make_step(impl: str, norm: str, eta: torch.Tensor):
    eps = EPS[norm]
    if impl == "unfused":
        return lambda x, xp, xo, g: xp.copy_(unfused_step(norm, x, xp, xo, g, eta, eps))
    if impl == "compile":
        fn = compiled_reference()
        return lambda x, xp, xo, g: xp.copy_(fn(norm, x, xp, xo, g, 0.0, eta, eps, None, MOMENTUM, 0.0, 1.0))
    return lambda x, xp, xo, g: apgd_ops.apgd_step_(
        x, xp, xo, g, eta=eta, eps=eps, momentum=MOMENTUM, norm=norm, backend=impl, check_values=False
    )


@pytest.mark.parametrize("impl", impls(IMPLS))
@pytest.mark.parametrize("size", sizes(SIZES))
@pytest.mark.parametrize("norm", NORMS)
def test_apgd_step(benchmark, size, norm, impl):
    if impl not in ("unfused", "compile"):
        why = apgd_ops.APGD_STEP.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    shape = SIZES[size]
    inputs = rotating_inputs(shape)
    eta = 2 * EPS[norm] * (0.5 + torch.rand(shape[0], device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)))
    step = make_step(impl, norm, eta)
    state = {"i": 0}

    def run():
        x, xp, xo, g = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        step(x, xp, xo, g)

    times = run_benchmark(benchmark, run)
    numel = torch.Size(shape).numel()
    record(
        benchmark,
        times,
        op="apgd_step",
        case=norm,
        size=size,
        shape=shape,
        impl=impl,
        bytes_moved=5 * 4 * numel,  # 4 reads + 1 write of float32
        norm=norm,
    )
