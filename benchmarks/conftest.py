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


def copy_bandwidth(numel: int, total_bytes: int = 256 * 2**20) -> float:
    """Bytes per second of ``dst.copy_(src)`` for float32 tensors of ``numel`` values (1 read +
    1 write per value), measured once per size in this process, rotating over enough buffers
    (like the ops' inputs) that caches do not flatter small sizes."""
    if numel not in _copy_cache:
        sets = max(1, min(32, total_bytes // (2 * 4 * numel)))
        pairs = [(torch.rand(numel, device=DEVICE), torch.empty(numel, device=DEVICE)) for _ in range(sets)]
        state = {"i": 0}

        def copy():
            src, dst = pairs[state["i"] % sets]
            state["i"] += 1
            dst.copy_(src)

        _copy_cache[numel] = 2 * 4 * numel / median_seconds(copy, repeats=max(20, 2 * sets))
    return _copy_cache[numel]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
