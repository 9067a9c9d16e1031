"""random_init (linf, l2): every body vs the unfused chain torchattacks runs for its random start
(``x + empty_like(x).uniform_(-eps, eps)``, clamp; for L2 a Gaussian direction, its norm, a
radius draw, rescale, clamp), from a CIFAR batch to an ImageNet batch.

Run: ``pyadvk bench --ops random_init``. Bytes moved per call: 1 read of x + 1 write of the
start, plus the noise written and read again (float32), which every body needs.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE, impls, record, run_benchmark, sizes
from pyadvk.ops import pgd as pgd_ops

SIZES = {
    "cifar-128": (128, 3, 32, 32),
    "cifar-512": (512, 3, 32, 32),
    "imagenet-32": (32, 3, 224, 224),
    "imagenet-256": (256, 3, 224, 224),
}
IMPLS = ["unfused", "torch", "cpp", "triton", "cuda"]
EPS = {"linf": 8 / 255, "l2": 0.5}


def unfused_init(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """torchattacks' random starts (PGD: uniform box; PGDL2: Gaussian direction, radius draw)."""
    if norm == "linf":
        return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
    b = x.shape[0]
    delta = torch.empty_like(x).normal_()
    n = delta.view(b, -1).norm(p=2, dim=1).view(b, 1, 1, 1)
    r = torch.zeros_like(n).uniform_(0, 1)
    delta = delta * (r / n * eps)
    return torch.clamp(x + delta, 0.0, 1.0)


@pytest.mark.parametrize("impl", impls(IMPLS))
@pytest.mark.parametrize("size", sizes(SIZES))
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_random_init(benchmark, size, norm, impl):
    if impl != "unfused":
        why = pgd_ops.RANDOM_INIT.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    shape = SIZES[size]
    numel = torch.Size(shape).numel()
    sets = max(1, min(16, (256 * 2**20) // (2 * 4 * numel)))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    inputs = [torch.rand(shape, device=DEVICE, generator=gen) for _ in range(sets)]
    state = {"i": 0}
    eps = EPS[norm]

    def run():
        x = inputs[state["i"] % sets]
        state["i"] += 1
        if impl == "unfused":
            return unfused_init(x, eps, norm)
        return pgd_ops.random_init(x, eps=eps, norm=norm, backend=impl, check_values=False)

    times = run_benchmark(benchmark, run)
    record(
        benchmark,
        times,
        op="random_init",
        case=norm,
        size=size,
        shape=shape,
        impl=impl,
        bytes_moved=4 * 4 * numel,
        norm=norm,
    )
