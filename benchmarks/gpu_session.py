"""One device call that fits the lease: build, check and time pyadvk's GPU bodies in stages, in
order of value, each stage writing its own result file as it ends, so that a call cut short still
returns everything finished before the cut (issue 14, section 1).

Run it through ``benchmarks/gpu_session.sh`` (which sets the build environment) or directly::

    OUT=/some/dir python -m benchmarks.gpu_session            # on a GPU machine, ~9 minutes
    python -m benchmarks.gpu_session --cpu --out /tmp/session   # the same stages on a CPU, tiny

Stages, each with its own time limit (never past the session's ``--budget``), and the one file
each leaves under the output folder (at most 8 files; nothing else is written there):

1. ``preflight`` -> ``session.txt``: the machine (GPU, driver, versions), the build log
   (``pip install --no-deps --no-build-isolation -e .`` with ``MAX_JOBS`` = cores and
   ``TORCH_CUDA_ARCH_LIST`` = the chip; when the CUDA build fails, a pure-Python install follows so
   that every Triton body still runs), ``pyadvk info``, and an import of every module the later
   stages need (a missing one is named here, not half-way through a stage). The summary of every
   later stage is appended to this file as the stage ends.
2. ``tests-bodies`` -> ``tests-bodies.txt``: the GPU tests (``-m gpu``) except the last group:
   every cuda and triton body against the torch body at the sizes that matter. No ``-x``.
3. five benchmark stages -> ``bench-<op>.json`` (``pyadvk bench``'s JSON, or the exit code and the
   end of its log when it wrote none): ``pgd_step`` (CIFAR-512, ImageNet-256, GB/s against the
   copy bandwidth), ``attack`` (PGD-10 on ResNet-18, batch 512: exact, fast, the floor and the
   unfused loop), ``power_iteration`` (batched against the per-layer loop), ``channel_stats``
   (against plain torch), ``autoattack`` (against torchattacks when it is installed).
4. ``tests-rest`` -> ``tests-rest.txt``: the remaining GPU tests (opcheck of the Triton ops, CUDA
   graph against eager, Inductor), whose names contain one of :data:`REST_KEYWORDS`.

A stage that fails or runs out of time does not stop the next one: a timed-out test stage gets
SIGINT first (pytest then prints the failures it has), and every stage's file ends with a plain
summary. The output (stdout) ends with the summary of every stage, the last lines the device tool
returns. ``--cpu`` runs the same stages on the CPU: no build (the installed extension), the cpp
bodies, the smallest sizes, quick rounds; the GPU tests are collected and skipped, which proves
that they import. ``tests/test_gpu_session.py`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what the device tool returns from $OUT at most
# GPU tests whose names contain one of these run in the last stage; every other GPU test runs in
# ``tests-bodies`` (CONTRIBUTING.md, "GPU run").
REST_KEYWORDS = ("opcheck", "graph", "inductor", "compile")
GRACE_S = 10.0  # between SIGINT and SIGKILL for a stage past its time
MIN_STAGE_S = 5.0  # a stage with less time left than this is skipped (and says so)
CPU_SLOWDOWN = 4  # --cpu: each stage may take this many times its GPU limit (a small, shared CPU)


@dataclass
class Outcome:
    """How a stage ended: ``status`` is "ok", "failed (exit N)", "timed out after N s",
    "skipped: ..." or "error: ..."; ``lines`` its plain-text summary."""

    status: str
    lines: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """One stage: ``name``, the result ``file`` it leaves under the output folder, its time
    limit ``limit_s`` and ``run(session, timeout_s) -> Outcome``."""

    name: str
    file: str
    limit_s: float
    run: Callable[[Session, float], Outcome]


@dataclass
class Session:
    """The output folder, the interpreter, the mode and the deadline every stage respects."""

    out: Path
    python: str
    cpu: bool
    deadline: float
    summaries: list[tuple[str, Outcome, float]] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.out / name

    def shell(self, cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> str:
        """Runs ``cmd`` (in its own process group, from the repository root) appending its output
        to ``log``; returns "ok", "failed (exit N)" or "timed out after N s". Past ``timeout_s``
        the group gets SIGINT, then SIGKILL :data:`GRACE_S` later."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=max(timeout_s, 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGINT)
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                f.write(f"\n[gpu_session: stopped after {timeout_s:.0f} s]\n")
                return f"timed out after {timeout_s:.0f} s"
        return "ok" if code == 0 else f"failed (exit {code})"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run_stages(session: Session, stages: list[Stage]) -> list[tuple[str, Outcome, float]]:
    """Runs ``stages`` in order; each gets ``min(limit_s, time left)``. Whatever a stage does
    (fails, times out, raises), its file exists afterwards (a note when the stage wrote none), its
    summary is appended to ``session.txt`` and printed, and the next stage runs."""
    files = {s.file for s in stages}
    if len(files) > MAX_FILES or len(files) != len(stages):
        raise ValueError(f"stages must write distinct files, at most {MAX_FILES}; got {[s.file for s in stages]}")
    session.out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        left = session.deadline - time.monotonic()
        t0 = time.monotonic()
        if left < MIN_STAGE_S:
            outcome = Outcome(f"skipped: {max(left, 0):.0f} s left of the session's budget")
        else:
            try:
                limit = stage.limit_s * (CPU_SLOWDOWN if session.cpu else 1)
                outcome = stage.run(session, min(limit, left))
            except Exception as e:  # a broken stage must not stop the next one
                outcome = Outcome(f"error: {type(e).__name__}: {e}")
        seconds = time.monotonic() - t0
        target = session.path(stage.file)
        if not target.exists() and target.name != "session.txt":  # session.txt gets the block below
            note = {"stage": stage.name, "status": outcome.status, "summary": outcome.lines}
            target.write_text(json.dumps(note, indent=1) if target.suffix == ".json" else _text(stage.name, outcome))
        session.summaries.append((stage.name, outcome, seconds))
        block = _block(stage.name, outcome, seconds)
        with open(session.path("session.txt"), "a") as f:
            f.write(block)
        print(block, end="", flush=True)
    return session.summaries


def _block(name: str, outcome: Outcome, seconds: float) -> str:
    return "".join(f"{line}\n" for line in [f"== {name}: {outcome.status} ({seconds:.0f} s)", *outcome.lines])


def _text(name: str, outcome: Outcome) -> str:
    return _block(name, outcome, 0.0)


def final_summary(summaries: list[tuple[str, Outcome, float]], started: float) -> str:
    """The last lines of the output: one status line per stage, then each stage's summary."""
    lines = [f"== gpu_session summary ({time.monotonic() - started:.0f} s)"]
    lines += [f"{name}: {outcome.status} ({seconds:.0f} s)" for name, outcome, seconds in summaries]
    for name, outcome, _ in summaries:
        if outcome.lines:
            lines += [f"-- {name}", *outcome.lines]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Stage 1: machine, build, info, imports


def _machine(session: Session, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"gpu_session {'CPU' if session.cpu else 'GPU'} mode, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.write(f"cores: {os.cpu_count()}, MAX_JOBS={os.environ.get('MAX_JOBS', '')}, ")
        f.write(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}\n")
    if shutil.which("nvidia-smi"):
        session.shell(
            ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm", "--format=csv"],
            log,
            30,
        )


def preflight(session: Session, timeout_s: float) -> Outcome:
    log = session.path("session.txt")
    end = time.monotonic() + timeout_s
    _machine(session, log)
    lines, status = [], "ok"
    if session.cpu:
        lines.append("build: skipped in CPU mode (the installed extension is used)")
    else:
        pip = [session.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
        t0 = time.monotonic()
        status = session.shell(pip, log, max(end - time.monotonic() - 60, 10), env={"PYADVK_FORCE_CUDA": "1"})
        lines.append(f"build (cuda + cpp bodies): {status} in {time.monotonic() - t0:.0f} s")
        if status != "ok":  # still install the package, so that every Triton body runs
            fallback = session.shell(pip, log, max(end - time.monotonic() - 30, 10), env={"PYADVK_SKIP_EXTENSION": "1"})
            lines.append(f"fallback install without the extension (triton and torch bodies only): {fallback}")
            status = f"build {status}"
    info = session.path("preflight.tmp")
    checked = session.shell([session.python, "-m", "benchmarks.gpu_session", "preflight"], info, end - time.monotonic())
    text = info.read_text()
    info.unlink()
    with open(log, "a") as f:
        f.write(text)
    lines += [line for line in text.splitlines() if line.startswith(("  cuda:", "  triton:", "  cpp:", "imports:"))]
    if checked != "ok":
        lines.append(f"preflight imports: {checked}")
    return Outcome(status if status != "ok" else checked, lines)


def check_imports() -> int:
    """``python -m benchmarks.gpu_session preflight``: ``pyadvk info``, then imports every module
    the stages need and checks every benchmark stage's selection against its file's sizes.
    Prints one line per failure; exit code 1 when any."""
    import importlib

    import tests.conftest  # noqa: F401  (first: sets TRITON_INTERPRET on a machine without a GPU)
    from pyadvk.cli import info

    print(info.describe(), flush=True)
    modules = ["torch", "triton", "pytest", "hypothesis", "pytest_benchmark", "pyadvk.kernels", "pyadvk.attacks"]
    modules += ["pyadvk.lipschitz", "pyadvk.stats", "pyadvk.models", "pyadvk.data", "benchmarks.runner"]
    modules += [f"benchmarks.bench_{op}" for op in BENCH_STAGES]
    modules += [f"tests.{p.stem}" for p in sorted((ROOT / "tests").glob("test_*_gpu.py"))]
    failures = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (every failure is reported, none stops the check)
            failures.append(f"import {name}: {type(e).__name__}: {e}")
            continue
        op = name.removeprefix("benchmarks.bench_")
        if op in BENCH_STAGES:
            failures += check_bench_options(op, getattr(module, "SIZES", {}))
    for line in failures:
        print(line)
    print(f"imports: {len(modules) - sum(f.startswith('import ') for f in failures)} of {len(modules)} ok", end="")
    print("" if not failures else f"; {len(failures)} problem(s): " + "; ".join(failures))
    return 1 if failures else 0


def check_bench_options(op: str, sizes: dict) -> list[str]:
    """Problems with ``BENCH_STAGES[op]`` in either mode: arguments ``pyadvk bench`` rejects,
    sizes the file does not declare, implementations no benchmark declares
    (``benchmarks.report.KNOWN_IMPLS``)."""
    import io

    from benchmarks.report import KNOWN_IMPLS
    from pyadvk.cli import build_parser

    problems = []
    for mode, opts in BENCH_STAGES[op].items():
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                build_parser().parse_args(bench_args(op, mode, "out"))
        except SystemExit:
            problems.append(
                f"bench {op} ({mode}): pyadvk bench rejects {bench_args(op, mode, 'out')}: {err.getvalue()}"
            )
        missing = [s for s in opts["sizes"].split(",") if s and s not in sizes]
        if missing:
            problems.append(f"bench {op} ({mode}): sizes {missing} not in its SIZES {list(sizes)}")
        unknown = [b for b in opts["backends"].split(",") if b not in KNOWN_IMPLS]
        if unknown:
            problems.append(f"bench {op} ({mode}): implementations {unknown} not in {list(KNOWN_IMPLS)}")
    return problems


# ----------------------------------------------------------------------------------------------
# Stages 2 and 4: the GPU tests


def _rest() -> str:
    return " or ".join(REST_KEYWORDS)


def pytest_summary(text: str, limit: int = 25) -> list[str]:
    """The count line pytest ends with and its FAILED/ERROR lines (at most ``limit``)."""
    lines = text.splitlines()
    bad = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    counts = [line for line in lines if line.startswith("=") and (" in " in line or "no tests ran" in line)]
    out = [counts[-1].strip("= ")] if counts else ["pytest printed no result line (stopped before the end)"]
    out += bad[:limit]
    if len(bad) > limit:
        out.append(f"... and {len(bad) - limit} more (see the file)")
    return out


def test_stage(selection: str) -> Callable[[Session, float], Outcome]:
    """The GPU tests (``-m gpu``) whose names match ``-k selection``."""

    def run(session: Session, timeout_s: float) -> Outcome:
        name = "tests-rest" if selection == _rest() else "tests-bodies"
        log = session.path(f"{name}.txt")
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*_gpu.py"))
        cmd = [session.python, "-m", "pytest", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider"]
        cmd += ["-m", "gpu", "-k", selection, *files]
        status = session.shell(cmd, log, timeout_s)
        lines = pytest_summary(log.read_text())
        with open(log, "a") as f:
            f.write(_text(name, Outcome(status, lines)))
        return Outcome(status, lines)

    return run


# ----------------------------------------------------------------------------------------------
# Stage 3: the headline benchmarks

# op -> mode -> pyadvk bench options (sizes empty: the file's sizes; "quick": few rounds, the
# smallest size). On CPU the cpp bodies run at the smallest size; Triton is not benchmarked there.
BENCH_STAGES: dict[str, dict[str, dict]] = {
    "pgd_step": {
        "gpu": {"sizes": "cifar-512,imagenet-256", "backends": "cuda,triton,torch", "quick": False, "limit": 75},
        "cpu": {"sizes": "cifar-128", "backends": "cpp", "quick": True},
    },
    "attack": {
        "gpu": {"sizes": "cifar-resnet18", "backends": "pyadvk,pyadvk-fast,torchattacks", "quick": False, "limit": 100},
        "cpu": {"sizes": "cifar-resnet18", "backends": "pyadvk", "quick": True},
    },
    "power_iteration": {
        "gpu": {"sizes": "", "backends": "cuda,triton,torch", "quick": False, "limit": 70},
        "cpu": {"sizes": "", "backends": "cpp", "quick": True},
    },
    "channel_stats": {
        "gpu": {"sizes": "", "backends": "cuda,triton,torch", "quick": False, "limit": 60},
        "cpu": {"sizes": "layer3-cifar-256", "backends": "cpp", "quick": True},
    },
    "autoattack": {
        "gpu": {"sizes": "", "backends": "pyadvk,pyadvk-fast,torchattacks", "quick": False, "limit": 70},
        "cpu": {"sizes": "", "backends": "pyadvk", "quick": True},
    },
}


def bench_args(op: str, mode: str, out: str) -> list[str]:
    """The ``pyadvk bench`` arguments of stage ``bench-<op>`` in ``mode`` ("gpu" or "cpu")."""
    opts = BENCH_STAGES[op][mode]
    args = ["bench", "--ops", op, "--no-compile", "--device", "cpu" if mode == "cpu" else "cuda", "--out", out]
    args += ["--sizes", opts["sizes"]] if opts["sizes"] else []
    return args + ["--backends", opts["backends"]] + (["--quick"] if opts["quick"] else [])


def bench_summary(data: dict) -> list[str]:
    """One line per row: op, case, size, implementation, median, GB/s and % of copy, speedup."""
    lines = []
    for r in data.get("rows", []):
        what = " ".join(str(r.get(k) or "") for k in ("op", "case", "size", "dtype", "impl")).split()
        figs = [f"{1e3 * r['median_s']:.3f} ms"]
        if r.get("gbps") is not None:
            figs.append(f"{r['gbps']:.0f} GB/s = {r.get('pct_of_copy', 0):.0f}% of copy")
        if r.get("speedup") is not None:
            figs.append(f"{r['speedup']:.2f}x {r.get('baseline')}")
        if r.get("overhead_vs_floor") is not None and r.get("impl") != "floor":
            figs.append(f"{100 * r['overhead_vs_floor']:+.1f}% vs floor")
        if r.get("robust_acc") is not None:
            figs.append(f"robust acc {100 * r['robust_acc']:.1f}%")
        lines.append(f"{' '.join(what)}: {', '.join(figs)}")
    lines += [f"not run: {line}" for line in data.get("not_run", [])]
    return lines


def bench_stage(op: str) -> Callable[[Session, float], Outcome]:
    """``pyadvk bench --ops op`` with the mode's options; its bench.json becomes bench-<op>.json."""

    def run(session: Session, timeout_s: float) -> Outcome:
        target = session.path(f"bench-{op}.json")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [session.python, "-m", "pyadvk", *bench_args(op, "cpu" if session.cpu else "gpu", tmp)]
            log = Path(tmp) / "stage.log"
            status = session.shell(cmd, log, timeout_s)
            result = Path(tmp) / "bench.json"
            if result.exists():
                data = json.loads(result.read_text())
                lines = bench_summary(data)
                data["gpu_session"] = {"stage": f"bench-{op}", "status": status, "command": shlex.join(cmd)}
            else:
                tail = log.read_text().splitlines()[-60:]
                pytest_log = Path(tmp) / "pytest.log"
                if pytest_log.exists():
                    tail += ["--- pytest.log"] + pytest_log.read_text().splitlines()[-60:]
                lines = [f"no results; the end of the log: {tail[-1] if tail else '(empty)'}"]
                data = {"gpu_session": {"stage": f"bench-{op}", "status": status, "command": shlex.join(cmd)}}
                data["log_tail"] = tail
            data["summary"] = lines
            target.write_text(json.dumps(data, indent=1))
        return Outcome(status, lines)

    return run


# ----------------------------------------------------------------------------------------------


def stages() -> list[Stage]:
    """The session's stages in order of value, with their GPU time limits (seconds); a stage
    reads the mode (GPU or ``--cpu``) from the session."""
    out = [
        Stage("preflight", "session.txt", 330, preflight),
        Stage("tests-bodies", "tests-bodies.txt", 170, test_stage(f"not ({_rest()})")),
    ]
    for op, modes in BENCH_STAGES.items():
        out.append(Stage(f"bench-{op}", f"bench-{op}.json", modes["gpu"]["limit"], bench_stage(op)))
    out.append(Stage("tests-rest", "tests-rest.txt", 240, test_stage(_rest())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "preflight"))
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu", help="result folder")
    parser.add_argument("--cpu", action="store_true", help="the same stages on the CPU (cpp bodies, tiny sizes)")
    parser.add_argument(
        "--budget", type=float, default=555.0, help="seconds for the whole session (default 555: ~9.5 min with exit)"
    )
    parser.add_argument("--stages", default=None, help="comma-separated stage names to run (default: all)")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        return check_imports()
    started = time.monotonic()
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: the folder must be empty or absent (the session writes at most 8 files)")
    chosen = stages()
    if args.stages:
        names = [s.strip() for s in args.stages.split(",")]
        unknown = sorted(set(names) - {s.name for s in chosen})
        if unknown:
            raise SystemExit(f"--stages: unknown {unknown}; stages: {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in names]
    session = Session(out, os.environ.get("PYTHON", sys.executable), args.cpu, started + args.budget)
    summaries = run_stages(session, chosen)
    print(final_summary(summaries, started), end="")
    return 0 if all(o.status == "ok" for _, o, _ in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
