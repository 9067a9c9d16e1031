"""Shared benchmark harness: the device, the selection made by ``pyadvk bench`` (environment
variables), the copy bandwidth measured in the same run (the ceiling every memory-bound op is
compared against) and :func:`record`, which gives every benchmark row the same fields.

Selection (set by ``pyadvk bench``, or by hand for a plain ``pytest benchmarks/...`` run):

- ``PYADVK_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda when available);
- ``PYADVK_BENCH_SIZES``: comma-separated size names to keep (default: every size of the file);
- ``PYADVK_BENCH_BACKENDS``: comma-separated implementations to keep (pyadvk bodies ``cuda``,
  ``triton``, ``cpp``, ``torch`` and the baselines ``unfused``, ``compile``, ``loop``, ...);
  the baselines that speedups are computed against (``unfused``, ``loop``, ``composite``,
  ``floor``, ``torchattacks-reimpl``) are always kept;
- ``PYADVK_BENCH_QUICK=1``: the smallest size of each file and fewer rounds (a smoke run);
- ``PYADVK_BENCH_COMPILE``: ``1`` keeps the ``torch.compile`` rows, ``0`` drops them (default:
  kept when ``compile`` is among the requested backends; without a backend list, kept in a full
  run and dropped in a quick one);
- ``PYADVK_BENCH_EVENTS``: a file to which every collected and finished row is appended as one
  JSON line (its op, implementation, size, outcome and, for a skipped row, the reason): how
  ``pyadvk bench`` shows progress and says which requested rows could not run and why.

Timing: on CUDA each call is timed with CUDA events (after warm-up), on CPU with
``time.perf_counter``; both rotate over enough input buffers that caches do not flatter small
sizes. Every row reports the median and the 20th/80th percentiles of the per-call times.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from benchmarks.report import BASELINES

DEVICE = torch.device(os.environ.get("PYADVK_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("PYADVK_BENCH_QUICK", "0") == "1"
# Every implementation name the imported bench_*.py files declared through impls(), whether this
# run selects it or not (``pyadvk bench`` checks --backends against it).
DECLARED: set[str] = set()


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


def _compile_rows() -> bool:
    """Whether the torch.compile rows run: PYADVK_BENCH_COMPILE if set, else whether ``compile``
    is among the requested backends, else in a full run but not in a quick one."""
    value = os.environ.get("PYADVK_BENCH_COMPILE", "").strip()
    if value:
        return value == "1"
    chosen = _env_list("PYADVK_BENCH_BACKENDS")
    return "compile" in chosen if chosen is not None else not QUICK


def sizes(all_sizes: dict) -> list[str]:
    """The size names of ``all_sizes`` (ordered small to large) that this run measures."""
    names = list(all_sizes)
    chosen = _env_list("PYADVK_BENCH_SIZES")
    if chosen is not None:
        names = [n for n in names if n in chosen]
    if QUICK and names:
        names = names[:1]
    return names


def impls(all_impls: list[str]) -> list[str]:
    """The implementations of ``all_impls`` that this run measures: those requested (all by
    default) plus the baselines speedups are computed against; ``compile`` only when
    :func:`_compile_rows` says so."""
    DECLARED.update(all_impls)
    chosen = _env_list("PYADVK_BENCH_BACKENDS")
    compiled = _compile_rows()
    return [i for i in all_impls if (compiled if i == "compile" else chosen is None or i in chosen or i in BASELINES)]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def median_seconds(fn, repeats: int = 20, warmup: int = 3) -> float:
    return sorted(call_times(fn, repeats, warmup))[repeats // 2]


def call_times(fn, repeats: int, warmup: int = 3) -> list[float]:
    """Per-call seconds of ``fn()``: CUDA events on CUDA, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync()
    if DEVICE.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(DEVICE)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_benchmark(
    benchmark, fn, *, max_seconds: float = 2.0, min_rounds: int = 5, max_rounds: int = 200
) -> list[float]:
    """Times ``fn`` with pytest-benchmark on CPU and with CUDA events on CUDA (where
    pytest-benchmark records a single round); returns the per-call seconds of the figures."""
    budget = 0.5 if QUICK else max_seconds
    t0 = time.perf_counter()
    fn()  # warm-up: absorbs compilation / autotuning / CUDA graph capture
    sync()
    first = time.perf_counter() - t0
    if first < budget / max(min_rounds, 1):  # cheap: time a few more calls to size the rounds
        first = median_seconds(fn, repeats=3, warmup=1)
    rounds = int(min(max_rounds, max(min_rounds if not QUICK else 3, budget / max(first, 1e-6))))

    def timed():
        fn()
        sync()

    if DEVICE.type == "cuda":  # the figures come from CUDA events; pytest-benchmark gets one round
        benchmark.pedantic(timed, rounds=1, iterations=1)
        return call_times(fn, repeats=max(rounds, 20), warmup=1)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    return list(benchmark.stats.stats.data)


def peak_memory(fn) -> int | None:
    """Peak device memory (bytes) allocated by one call of ``fn`` above what was live before it;
    None on CPU (torch's CPU allocator keeps no peak statistics)."""
    if DEVICE.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    fn()
    sync()
    return torch.cuda.max_memory_allocated(DEVICE) - before


def record(
    benchmark,
    times: list[float],
    *,
    op: str,
    size: str,
    shape,
    impl: str,
    dtype="float32",
    case: str = "",
    bytes_moved: int | None = None,
    peak_bytes: int | None = None,
    **extra,
) -> None:
    """Stores one row's figures in ``benchmark.extra_info`` (the fields ``pyadvk bench`` and
    ``benchmarks/summarize.py`` read): median and p20/p80 seconds, GB/s of ``bytes_moved`` per
    call and its share of the float32 copy bandwidth of the same number of bytes, peak memory."""
    median = percentile(times, 0.5)
    info = dict(
        op=op,
        case=case,
        size=size,
        shape=list(shape),
        dtype=str(dtype).replace("torch.", ""),
        impl=impl,
        device=device_name(),
        threads=torch.get_num_threads(),
        median_s=median,
        p20_s=percentile(times, 0.2),
        p80_s=percentile(times, 0.8),
        rounds=len(times),
        peak_bytes=peak_bytes,
    )
    if bytes_moved:
        copy = copy_bandwidth(max(1, bytes_moved // 8))  # same bytes moved by a float32 copy
        info.update(
            bytes=bytes_moved,
            gbps=bytes_moved / median / 1e9,
            copy_gbps=copy / 1e9,
            pct_of_copy=100 * (bytes_moved / median) / copy,
        )
    info.update(extra)
    benchmark.extra_info.update(info)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


# --------------------------------------------------------------------------------------------
# The event log pyadvk bench reads (PYADVK_BENCH_EVENTS)


def _event(**fields) -> None:
    path = os.environ.get("PYADVK_BENCH_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def pytest_collection_finish(session) -> None:
    _event(event="collected", n=len(session.items))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # One event per row: at setup when it ends there (skipped or an error), else after the call.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        params = getattr(getattr(item, "callspec", None), "params", {})
        _event(
            event="row",
            file=item.path.stem,
            test=item.name,
            impl=params.get("impl"),
            size=params.get("size"),
            outcome=report.outcome,
            reason=_skip_reason(report) if report.skipped else None,
        )
