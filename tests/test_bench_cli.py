"""``pyadvk bench``: a quick run prints one table and writes the JSON and plot; rows that cannot run
are listed with the reason; selection errors are clear; the plot keeps one colour per backend."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyadvk
from benchmarks import conftest as bench_conftest
from benchmarks import report, runner
from pyadvk.cli import bench, main

ROOT = Path(__file__).resolve().parents[1]

# A suite of one cheap op with a baseline, a compiled row, a body that runs and one that cannot:
# the whole pipeline (subprocess, events, table, skip reasons, files) in a few seconds.
TINY_BENCH = """
import pytest
import torch

from benchmarks.conftest import impls, record, run_benchmark, sizes

SIZES = {"small": (64, 64), "large": (1024, 1024)}


@pytest.mark.parametrize("impl", impls(["unfused", "compile", "cpp", "cuda"]))
@pytest.mark.parametrize("size", sizes(SIZES))
def test_tiny(benchmark, size, impl):
    if impl == "cuda":
        pytest.skip("no CUDA device is visible")
    x = torch.rand(SIZES[size])
    times = run_benchmark(benchmark, lambda: x.mul(2.0), max_seconds=0.05)
    record(benchmark, times, op="tiny", size=size, shape=x.shape, impl=impl, bytes_moved=8 * x.numel())
"""


def _args(**kw) -> argparse.Namespace:
    base = dict(ops=None, sizes=None, backends=None, quick=False, compile=None, device=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def tiny_suite(tmp_path) -> Path:
    suite = tmp_path / "checkout" / "benchmarks"
    suite.mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "report.py", "runner.py"):
        shutil.copy(ROOT / "benchmarks" / name, suite / name)
    (suite / "bench_tiny.py").write_text(TINY_BENCH)
    return suite


def _run_cli(suite: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYADVK_BENCH")}
    env["PYTHONPATH"] = os.pathsep.join([str(suite.parent), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "pyadvk", "bench", "--suite", str(suite), *argv],
        cwd=suite.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_quick_run_prints_one_table_and_the_rows_that_did_not_run(tiny_suite, tmp_path):
    out = tmp_path / "res"
    proc = _run_cli(tiny_suite, "--quick", "--backends", "cpp,cuda,foolbox", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stdout = proc.stdout
    # one table: ours, not pytest-benchmark's, and no deprecation noise
    assert "| tiny |  | small | float32 | cpp |" in stdout and "| tiny |  | small | float32 | unfused |" in stdout
    assert "Name (time in" not in stdout + proc.stderr
    assert "DeprecationWarning" not in stdout + proc.stderr
    assert "large" not in stdout  # --quick: the smallest size only
    assert "| compile |" not in stdout  # --quick: no torch.compile rows unless asked
    assert "skipped  tiny cuda (1 row): no CUDA device is visible" in stdout
    assert "skipped  foolbox: not an implementation of tiny" in stdout
    data = json.loads((out / "bench.json").read_text())
    assert {r["impl"] for r in data["rows"]} == {"unfused", "cpp"}  # the baseline always runs
    assert data["selection"]["quick"] is True and data["selection"]["compile"] is False
    for r in data["rows"]:
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["gbps"] > 0 and r["baseline"] == "unfused"
    assert any("no CUDA device" in line for line in data["not_run"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test_tiny" in (out / "pytest.log").read_text()


@pytest.mark.slow
def test_quick_run_of_a_real_op_with_compile(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["bench", "--ops", "pgd_step", "--quick", "--compile", "--backends", "cpp,compile", "--device", "cpu"]
    code = main([*argv, "--out", str(out)])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"unfused", "cpp", "compile"}
    assert {r["case"] for r in rows} == {"linf", "l2"} and {r["size"] for r in rows} == {"cifar-128"}
    assert all(r["speedup"] > 0 for r in rows)
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    text = capsys.readouterr().out
    assert "| pgd_step | linf | cifar-128 | float32 | cpp |" in text and "× unfused" in text


def test_rows_speedup_and_floor_overhead():
    def b(op, impl, median, **kw):
        return {
            "name": f"test_{op}",
            "stats": {"median": median, "q1": median, "q3": median},
            "extra_info": dict(op=op, size="s", impl=impl, median_s=median, **kw),
        }

    data = {
        "benchmarks": [
            b("pgd10", "floor", 1.0),
            b("pgd10", "torchattacks-reimpl", 2.0),
            b("pgd10", "pyadvk", 1.25),
            b("x", "cpp", 0.5),
            b("x", "torch", 2.0),
        ]
    }
    rows = {(r["op"], r["impl"]): r for r in report.rows_from_pytest(data)}
    assert rows["pgd10", "pyadvk"]["speedup"] == pytest.approx(1.6)
    assert rows["pgd10", "pyadvk"]["overhead_vs_floor"] == pytest.approx(0.25)
    assert rows["x", "cpp"]["speedup"] is None  # no baseline in that group
    assert "+25.0% vs floor" in report.table(list(rows.values()))


def test_plot_keeps_one_colour_per_backend_and_draws_the_copy_line():
    from matplotlib.colors import to_hex

    def row(op, impl, mib, gbps):
        return dict(op=op, case="", dtype="float32", impl=impl, bytes=mib * 2**20, gbps=gbps, copy_gbps=10.0)

    # the two panels list different implementations, in different orders
    rows = [row("a", "unfused", 1, 1.0), row("a", "cpp", 1, 2.0), row("b", "cpp", 1, 3.0), row("b", "cuda", 1, 4.0)]
    fig = report.figure(rows)
    try:
        colours: dict[str, set[str]] = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                colours.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
            copy = next(h for h, t in zip(*ax.get_legend_handles_labels()) if t == "copy")
            assert copy.get_linestyle() == "--" and copy.get_marker() == "x"  # visible with one point
        assert all(len(c) == 1 for c in colours.values()), colours
        assert len({next(iter(colours[i])) for i in ("unfused", "cpp", "cuda")}) == 3
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert report.figure([dict(op="x", impl="cpp", size="s")]) is None  # nothing to plot


def test_every_declared_implementation_is_known():
    """Each implementation a bench file declares has a fixed colour and passes --backends."""
    for op in runner.suite_ops():
        runner.bench_module(op)
    assert bench_conftest.DECLARED, "no bench file declared its implementations through impls()"
    assert bench_conftest.DECLARED <= set(report.KNOWN_IMPLS), bench_conftest.DECLARED - set(report.KNOWN_IMPLS)
    assert "torchattacks-as-shipped" in bench_conftest.DECLARED


@pytest.mark.parametrize(
    "env, quick, expected",
    [
        ({}, False, ["unfused", "compile", "cpp"]),
        ({"PYADVK_BENCH_COMPILE": "0"}, False, ["unfused", "cpp"]),
        ({"PYADVK_BENCH_COMPILE": "1", "PYADVK_BENCH_BACKENDS": "cpp"}, True, ["unfused", "compile", "cpp"]),
        ({"PYADVK_BENCH_BACKENDS": "cpp"}, False, ["unfused", "cpp"]),  # baselines always kept
        ({}, True, ["unfused", "cpp"]),
        ({"PYADVK_BENCH_BACKENDS": "compile"}, True, ["unfused", "compile"]),
        ({"PYADVK_BENCH_COMPILE": "0", "PYADVK_BENCH_BACKENDS": "compile,cpp"}, False, ["unfused", "cpp"]),
    ],
)
def test_impls_selection(monkeypatch, env, quick, expected):
    for name in ("PYADVK_BENCH_COMPILE", "PYADVK_BENCH_BACKENDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bench_conftest, "QUICK", quick)
    assert bench_conftest.impls(["unfused", "compile", "cpp"]) == expected


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(), True),
        (dict(quick=True), False),
        (dict(quick=True, compile=True), True),
        (dict(quick=True, backends="cpp,compile"), True),
        (dict(backends="cpp"), False),
        (dict(backends="cpp", compile=True), True),
        (dict(compile=False), False),
    ],
)
def test_compile_rows(kw, expected):
    assert runner.compile_rows(_args(**kw)) is expected


def test_not_run_lines():
    events = [
        dict(file="bench_x", test="t[a-cuda]", impl="cuda", size="a", outcome="skipped", reason="no CUDA device"),
        dict(file="bench_x", test="t[b-cuda]", impl="cuda", size="b", outcome="skipped", reason="no CUDA device"),
        dict(file="bench_x", test="t[a-cpp]", impl="cpp", size="a", outcome="failed", reason=None),
        dict(file="bench_x", test="t[a-torch]", impl="torch", size="a", outcome="passed", reason=None),
    ]
    lines = runner.not_run(_args(backends="cuda,fab"), ["pgd_step"], events)
    assert "skipped  x cuda (2 rows): no CUDA device" in lines
    assert "FAILED   x cpp (1 row): t[a-cpp]" in lines
    assert any(line.startswith("skipped  fab: not an implementation of pgd_step") for line in lines)
    assert not any("torch" in line for line in lines)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--ops", "nope"], "--ops: unknown op"),
        (["--ops", "pgd_step", "--backends", "fortran"], "--backends: unknown implementation"),
        (["--ops", "pgd_step", "--sizes", "huge"], "--sizes: unknown size"),
        (["--suite", "/nonexistent"], "--suite /nonexistent: not a pyadvk benchmarks folder"),
    ],
)
def test_selection_errors(argv, match, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert match in capsys.readouterr().err


def test_without_a_checkout_the_message_says_where_the_suite_lives(monkeypatch, tmp_path, capsys):
    installed = tmp_path / "site-packages" / "pyadvk"
    installed.mkdir(parents=True)
    monkeypatch.setattr(pyadvk, "__file__", str(installed / "__init__.py"))
    assert main(["bench", "--list"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/ folder of a pyadvk source checkout" in err and "--suite DIR" in err
    assert bench.find_suite(str(ROOT / "benchmarks")) == ROOT / "benchmarks"


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "pgd_step: sizes cifar-128" in out and "attack: sizes cifar-resnet18" in out
