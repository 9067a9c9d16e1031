"""``pyadvk bench``: a quick run writes the table, JSON and plot; selection errors are clear."""

from __future__ import annotations

import json

import pytest

from pyadvk.cli import bench, main


@pytest.mark.slow
def test_quick_run_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench", "--ops", "pgd_step", "--quick", "--backends", "cpp", "--device", "cpu", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"unfused", "cpp"}  # the baseline always runs
    assert {r["case"] for r in rows} == {"linf", "l2"} and {r["size"] for r in rows} == {"cifar-128"}
    for r in rows:
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["gbps"] > 0 and r["copy_gbps"] > 0 and r["baseline"] == "unfused"
    cpp = [r for r in rows if r["impl"] == "cpp"]
    assert all(r["speedup"] > 0 for r in cpp)
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    assert "| pgd_step | linf | cifar-128 | float32 | cpp |" in table
    assert "× unfused" in capsys.readouterr().out


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
    rows = {(r["op"], r["impl"]): r for r in bench.rows_from_pytest(data)}
    assert rows["pgd10", "pyadvk"]["speedup"] == pytest.approx(1.6)
    assert rows["pgd10", "pyadvk"]["overhead_vs_floor"] == pytest.approx(0.25)
    assert rows["x", "cpp"]["speedup"] is None  # no baseline in that group
    assert "+25.0% vs floor" in bench.table(list(rows.values()))


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


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "pgd_step: sizes cifar-128" in out and "attack: sizes cifar-resnet18" in out
