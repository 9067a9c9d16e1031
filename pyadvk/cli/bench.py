"""``pyadvk bench``: runs the benchmark suite (``benchmarks/bench_<op>.py``, pytest-benchmark) on
this machine and reports every figure: a table on stdout and in ``bench.md``, a JSON file with the
machine and versions, and a PNG of bandwidth against size per op and backend.

The suite lives in the ``benchmarks/`` folder of a source checkout (it is not installed with the
package); an editable install finds it by itself, otherwise pass ``--suite DIR``.

Each row: op, case (e.g. the norm), size, dtype, implementation (a pyadvk body ``cuda``,
``triton``, ``cpp``, ``torch`` or a baseline), median and p20/p80 time per call, speedup over the
row's baseline (the unfused PyTorch chain, a per-layer loop or the composite expression; for the
end-to-end attacks the torchattacks loop, plus the overhead over the bare forward+backward floor),
effective GB/s and its share of the copy bandwidth measured in the same run, and peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from pyadvk import _io
from pyadvk.cli.common import UserError, check_output_dir, say

BASELINE_ORDER = ("unfused", "loop", "composite", "torchattacks-reimpl")
FLOOR = "floor"
KNOWN_IMPLS = (
    "cuda",
    "triton",
    "cpp",
    "torch",
    "compile",
    "unfused",
    "loop",
    "composite",
    "floor",
    "torchattacks-reimpl",
    "pyadvk",
    "pyadvk-fast",
    "torchattacks",
    "foolbox",
)


def add_parser(sub) -> None:
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
    p.add_argument("--quick", action="store_true", help="smallest size of each op, few rounds (a smoke run)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if present")
    p.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="folder for bench.json, bench.md, bench.png (default: bench-results)",
    )
    p.add_argument("--suite", default=None, metavar="DIR", help="the benchmarks/ folder (default: the checkout's)")
    p.add_argument("--list", action="store_true", help="list the ops and their sizes, then exit")
    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------
# The suite


def find_suite(path: str | None) -> Path:
    if path is not None:
        suite = Path(path)
        if not (suite / "conftest.py").is_file():
            raise UserError(f"--suite {path}: not a pyadvk benchmarks folder (no conftest.py in it)")
        return suite.resolve()
    import pyadvk

    suite = Path(pyadvk.__file__).resolve().parents[1] / "benchmarks"
    if not (suite / "conftest.py").is_file():
        raise UserError(
            "the benchmark suite (benchmarks/ of a pyadvk source checkout) was not found next to the "
            f"installed package ({suite}); pass --suite DIR"
        )
    return suite


def suite_ops(suite: Path) -> dict[str, Path]:
    return {f.stem[len("bench_") :]: f for f in sorted(suite.glob("bench_*.py"))}


def op_sizes(suite: Path, file: Path) -> list[str]:
    """The SIZES names a benchmark file declares (imported with the checkout on sys.path)."""
    root = str(suite.parent)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks.{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return list(getattr(module, "SIZES", {}))
    finally:
        if added:
            sys.path.remove(root)


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def select(args, suite: Path) -> tuple[list[str], dict[str, Path]]:
    ops = suite_ops(suite)
    if not ops:
        raise UserError(f"no bench_*.py files in {suite}")
    chosen = _csv(args.ops) or list(ops)
    unknown = [o for o in chosen if o not in ops]
    if unknown:
        raise UserError(f"--ops: unknown op(s) {', '.join(unknown)}; available: {', '.join(ops)}")
    backends = _csv(args.backends)
    if backends is not None:
        bad = [b for b in backends if b not in KNOWN_IMPLS]
        if bad:
            raise UserError(f"--backends: unknown implementation(s) {', '.join(bad)}; known: {', '.join(KNOWN_IMPLS)}")
    sizes = _csv(args.sizes)
    if sizes is not None:
        known = {s for op in chosen for s in op_sizes(suite, ops[op])}
        bad = [s for s in sizes if s not in known]
        if bad:
            raise UserError(
                f"--sizes: unknown size(s) {', '.join(bad)} for ops {', '.join(chosen)}; "
                f"available: {', '.join(sorted(known))}"
            )
    return chosen, ops


# --------------------------------------------------------------------------------------------
# Figures


def rows_from_pytest(data: dict) -> list[dict]:
    """One dict per benchmark of a pytest-benchmark JSON (the fields :func:`record` stored), with
    ``speedup`` over the row's baseline and, for attacks, ``overhead_vs_floor``."""
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "impl" not in info:
            continue
        info.setdefault("op", b.get("group") or b["name"].split("[")[0])
        info.setdefault("case", info.get("norm", ""))
        info.setdefault("median_s", info.get("median", b["stats"]["median"]))
        info.setdefault("p20_s", b["stats"].get("q1", info["median_s"]))
        info.setdefault("p80_s", b["stats"].get("q3", info["median_s"]))
        info.setdefault("dtype", "float32")
        rows.append(info)
    key = lambda r: (r["op"], r.get("case", ""), r["size"], r.get("dtype", "float32"))  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r["median_s"]
    for r in rows:
        impls = groups[key(r)]
        base = next((b for b in BASELINE_ORDER if b in impls), None)
        r["baseline"] = base
        r["speedup"] = impls[base] / r["median_s"] if base else None
        if FLOOR in impls:
            r["overhead_vs_floor"] = r["median_s"] / impls[FLOOR] - 1.0
    return rows


def _ms(s: float | None) -> str:
    return "" if s is None else f"{1e3 * s:.3f}" if s < 1 else f"{1e3 * s:.0f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| op | case | size | dtype | impl | median ms | p20–p80 ms | speedup | GB/s | % of copy | peak MiB | notes |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speed = "" if r.get("speedup") is None else f"{r['speedup']:.2f}× {r['baseline']}"
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") is not None else ""
        pct = f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") is not None else ""
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else ""
        notes = []
        if r.get("images_per_s") is not None:
            notes.append(f"{r['images_per_s']:.1f} img/s")
        if r.get("overhead_vs_floor") is not None and r["impl"] != FLOOR:
            notes.append(f"{100 * r['overhead_vs_floor']:+.1f}% vs floor")
        if r.get("robust_acc") is not None:
            notes.append(f"robust acc {100 * r['robust_acc']:.1f}%")
        for k, v in r.items():
            if k.startswith("note_"):
                notes.append(f"{k[5:]}: {v}")
        lines.append(
            f"| {r['op']} | {r.get('case', '')} | {r['size']} | {r.get('dtype', '')} | {r['impl']} | "
            f"{_ms(r['median_s'])} | {_ms(r.get('p20_s'))}–{_ms(r.get('p80_s'))} | {speed} | {gbps} | "
            f"{pct} | {peak} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    """Bandwidth vs bytes moved, one panel per op (and case), one line per implementation, the
    copy bandwidth dashed. False when no row has a bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = {}
    for r in rows:
        if r.get("gbps") is None:
            continue
        name = r["op"] + (f" ({r['case']})" if r.get("case") else "") + f" {r.get('dtype', '')}"
        panels.setdefault(name, []).append(r)
    if not panels:
        return False
    n = len(panels)
    cols = min(3, n)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)), squeeze=False
    )
    for ax, (name, items) in zip(axes.flat, panels.items()):
        by_impl: dict = {}
        for r in items:
            by_impl.setdefault(r["impl"], []).append(r)
        for impl, rs in sorted(by_impl.items()):
            rs.sort(key=lambda r: r["bytes"])
            ax.plot([r["bytes"] / 2**20 for r in rs], [r["gbps"] for r in rs], marker="o", label=impl)
        copy = sorted((r["bytes"], r["copy_gbps"]) for r in items if r.get("copy_gbps"))
        if copy:
            ax.plot([c[0] / 2**20 for c in copy], [c[1] for c in copy], "k--", label="copy")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("MiB moved per call")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _io.save_figure(fig, path)
    return True


def machine() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    from pyadvk import _extension

    info["extension"] = _extension.build_info()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------


def run(args) -> int:
    check_output_dir("--out", None if args.list else args.out, ("bench.json", "bench.md", "bench.png", "pytest.log"))
    suite = find_suite(args.suite)
    if args.list:
        for op, file in suite_ops(suite).items():
            print(f"{op}: sizes {', '.join(op_sizes(suite, file)) or '-'}")
        return 0
    ops, files = select(args, suite)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible")
    env = dict(os.environ)
    for name, value in (
        ("PYADVK_BENCH_SIZES", args.sizes),
        ("PYADVK_BENCH_BACKENDS", args.backends),
        ("PYADVK_BENCH_DEVICE", args.device),
    ):
        if value:
            env[name] = value
    env["PYADVK_BENCH_QUICK"] = "1" if args.quick else env.get("PYADVK_BENCH_QUICK", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            f"--benchmark-json={raw}",
            f"--rootdir={suite.parent}",
            "-o",
            "python_files=bench_*.py",
            *[str(files[o]) for o in ops],
        ]
        say("running:", " ".join(cmd[2:]))
        proc = subprocess.run(cmd, cwd=suite.parent, env=env)
        if not raw.exists():
            raise UserError(f"the benchmark run failed (pytest exit code {proc.returncode}) and wrote no results")
        data = json.loads(raw.read_text())
    rows = rows_from_pytest(data)
    if not rows:
        raise UserError("no benchmark matched the selection (every row was skipped or deselected)")
    result = {
        "machine": machine(),
        "selection": {"ops": ops, "sizes": args.sizes, "backends": args.backends, "quick": args.quick},
        "pytest_exit_code": proc.returncode,
        "rows": rows,
    }
    text = table(rows)
    head = f"Machine: {result['machine'].get('gpu') or result['machine']['cpu']}, torch {result['machine']['torch']}"
    _io.save_json(result, out / "bench.json")
    with _io.atomic_open(out / "bench.md") as f:
        f.write(head + "\n\n" + text + "\n")
    plotted = plot(rows, str(out / "bench.png"))
    print(head + "\n\n" + text)
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'bench.png'}" if plotted else ""))
    if proc.returncode not in (0, 5):
        print(f"pyadvk bench: warning: pytest exited with code {proc.returncode} (see above)", file=sys.stderr)
        return 1
    return 0
