"""Shared benchmark fixtures: the device, and the copy bandwidth measured in the same run (the
ceiling every memory-bound op is compared against)."""

from __future__ import annotations

import os
import time

import pytest
import torch

DEVICE = torch.device(os.environ.get("PYADVK_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_seconds(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


_copy_cache: dict[int, float] = {}


def copy_bandwidth(numel: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` for float32 tensors of ``numel`` values (1 read +
    1 write per value), measured once per size in this process."""
    if numel not in _copy_cache:
        src = torch.rand(numel, device=DEVICE)
        dst = torch.empty_like(src)
        t = median_seconds(lambda: dst.copy_(src))
        _copy_cache[numel] = 2 * 4 * numel / t
    return _copy_cache[numel]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
