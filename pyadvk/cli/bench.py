"""``pyadvk bench``: runs the benchmark suite (``benchmarks/bench_<op>.py``, pytest-benchmark) on
this machine and reports every figure: one table on stdout and in ``bench.md``, a JSON file with
the machine and versions, and a PNG of bandwidth against size per op and backend. Rows that could
not run (a backend this machine lacks, a peer library not installed) are listed with the reason.

The suite and its machinery live in the ``benchmarks/`` folder of a source checkout (they are not
installed with the package); an editable install finds it by itself, otherwise pass ``--suite DIR``.

Each row: op, case (e.g. the norm), size, dtype, implementation (a pyadvk body ``cuda``,
``triton``, ``cpp``, ``torch`` or a baseline), median and p20/p80 time per call, speedup over the
row's baseline (the unfused PyTorch chain, a per-layer loop or the composite expression; for the
end-to-end attacks the torchattacks loop, plus the overhead over the bare forward+backward floor),
effective GB/s and its share of the copy bandwidth measured in the same run, and peak memory.

``--quick`` measures the smallest size of each op with few rounds and without the torch.compile
rows (``--compile`` adds them back): a smoke run of a minute or two on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from pyadvk.cli.common import UserError, check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run the benchmark suite and report time, bandwidth, speedups",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ops", default=None, help="comma-separated ops to run (default: all; see --list)")
    p.add_argument("--sizes", default=None, help="comma-separated size names (default: all of each op)")
    p.add_argument(
        "--backends", default=None, help="comma-separated implementations to run, e.g. cpp,torch (baselines always run)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smallest size of each op, few rounds, no torch.compile rows (a smoke run)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include the torch.compile rows (default: when --backends lists compile; "
        "without --backends, yes except with --quick)",
    )
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if present")
    p.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="folder for bench.json, bench.md, bench.png and pytest.log (default: bench-results)",
    )
    p.add_argument("--suite", default=None, metavar="DIR", help="the benchmarks/ folder (default: the checkout's)")
    p.add_argument("--list", action="store_true", help="list the ops and their sizes, then exit")
    p.set_defaults(run=run)


def find_suite(path: str | None) -> Path:
    """The benchmarks/ folder: ``--suite DIR`` or the one next to this package in a checkout."""
    if path is not None:
        suite = Path(path)
        if not (suite / "runner.py").is_file():
            raise UserError(f"--suite {path}: not a pyadvk benchmarks folder (no runner.py in it)")
        return suite.resolve()
    import pyadvk

    suite = Path(pyadvk.__file__).resolve().parents[1] / "benchmarks"
    if not (suite / "runner.py").is_file():
        raise UserError(
            "pyadvk bench runs the benchmark suite in the benchmarks/ folder of a pyadvk source checkout, "
            f"which is not installed with the package (looked in {suite}): run it from a clone "
            "(pip install -e .) or pass --suite DIR"
        )
    return suite


def load_runner(suite: Path) -> ModuleType:
    """Imports ``benchmarks.runner`` from ``suite`` (its parent goes first on sys.path: the bench
    files import ``benchmarks.conftest``)."""
    root = str(suite.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    runner = importlib.import_module("benchmarks.runner")
    where = Path(runner.__file__ or "<no file>")
    if where.resolve().parent != suite:
        raise UserError(
            f"--suite {suite}: another package named 'benchmarks' is imported from "
            f"{where.parent}; run pyadvk bench from the checkout instead"
        )
    return runner


def run(args: argparse.Namespace) -> int:
    check_output_dir("--out", None if args.list else args.out, ("bench.json", "bench.md", "bench.png", "pytest.log"))
    return load_runner(find_suite(args.suite)).run(args)
