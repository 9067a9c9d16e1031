"""The figures of a benchmark run: rows from pytest-benchmark's JSON (the fields
:func:`benchmarks.conftest.record` stored), speedups over each group's baseline, the Markdown
table, the bandwidth plot and the machine description. Used by ``pyadvk bench``
(:mod:`benchmarks.runner`) and ``benchmarks/summarize.py``.
"""

from __future__ import annotations

import datetime
import platform
import subprocess

from pyadvk import _io

# Every implementation name a benchmark may declare (``impls([...])`` in a bench_*.py file), in the
# order their colours are assigned: pyadvk's bodies, then the baselines, then the peers. A name
# keeps its colour in every panel of bench.png; tests check that the suite declares no other.
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
    "torchattacks-as-shipped",
    "foolbox",
    "l2min",
    "fab",
    "fab-t",
    "deepfool",
    "foolbox-ddn",
    "foolbox-fmn",
)
# The baselines a group's speedup is computed against, first present wins; ``floor`` (the bare
# forward+backward of an attack) gives the overhead column instead.
BASELINE_ORDER = ("unfused", "loop", "composite", "torchattacks-reimpl")
FLOOR = "floor"
# Rows ``pyadvk bench --backends`` always keeps: without them no speedup can be computed.
BASELINES = (*BASELINE_ORDER, FLOOR)


def rows_from_pytest(data: dict) -> list[dict]:
    """One dict per benchmark of a pytest-benchmark JSON (the fields ``record`` stored), with
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

    def key(r: dict) -> tuple:
        return r["op"], r.get("case", ""), r["size"], r.get("dtype", "float32")

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
    """The Markdown table ``pyadvk bench`` prints and writes to bench.md, one line per row."""
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


def impl_colors() -> dict[str, tuple]:
    """A fixed colour per implementation (the same in every panel and every run)."""
    import matplotlib

    palette = sum((matplotlib.colormaps[m].colors for m in ("tab10", "Dark2", "Set2")), ())
    return {name: palette[i % len(palette)] for i, name in enumerate(KNOWN_IMPLS)}


def plot(rows: list[dict], path: str) -> bool:
    """Writes :func:`figure` of ``rows`` to ``path``; False (and no file) when no row has a bandwidth."""
    fig = figure(rows)
    if fig is None:
        return False
    _io.save_figure(fig, path)
    return True


def figure(rows: list[dict]):
    """Bandwidth vs bytes moved, one panel per op (and case), one line per implementation in its
    fixed colour, the copy bandwidth measured in the same run as a dashed black line with crosses
    (visible even when the panel has a single size). None when no row has a bandwidth."""
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
        return None
    colors = impl_colors()
    n = len(panels)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (name, items) in zip(axes.flat, panels.items()):
        by_impl: dict = {}
        for r in items:
            by_impl.setdefault(r["impl"], []).append(r)
        for impl in sorted(by_impl, key=lambda i: KNOWN_IMPLS.index(i) if i in KNOWN_IMPLS else len(KNOWN_IMPLS)):
            rs = sorted(by_impl[impl], key=lambda r: r["bytes"])
            ax.plot(
                [r["bytes"] / 2**20 for r in rs],
                [r["gbps"] for r in rs],
                marker="o",
                color=colors.get(impl, "grey"),
                label=impl,
            )
        copy = sorted({(r["bytes"], r["copy_gbps"]) for r in items if r.get("copy_gbps")})
        if copy:
            ax.plot(
                [c[0] / 2**20 for c in copy],
                [c[1] for c in copy],
                color="black",
                linestyle="--",
                marker="x",
                label="copy",
            )
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("MiB moved per call")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def machine() -> dict:
    """Date, versions, CPU (and GPU, driver) and the extension's build: stored in bench.json."""
    import torch

    from pyadvk import _extension

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": cpu_name(),
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
    info["extension"] = _extension.build_info()
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
