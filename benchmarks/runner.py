"""What ``pyadvk bench`` runs (pyadvk/cli/bench.py parses the command line and hands over here):
checks the selection against the suite, runs the chosen ``bench_<op>.py`` files with pytest-benchmark
in a subprocess (its own output goes to ``pytest.log`` in the output folder; a progress bar follows
the rows), then prints one table, says which rows could not run and why, and writes ``bench.json``
(machine, versions, selection, every figure), ``bench.md`` and ``bench.png``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from pyadvk import _io
from pyadvk.cli.common import UserError

SUITE = Path(__file__).resolve().parent


def suite_ops() -> dict[str, Path]:
    """op name -> its bench_<op>.py file."""
    return {f.stem[len("bench_") :]: f for f in sorted(SUITE.glob("bench_*.py"))}


def bench_module(op: str):
    """The imported ``benchmarks.bench_<op>`` module (its SIZES, and the names it declares)."""
    return importlib.import_module(f"benchmarks.bench_{op}")


def op_sizes(op: str) -> list[str]:
    """The SIZES names ``bench_<op>.py`` declares, small to large."""
    return list(getattr(bench_module(op), "SIZES", {}))


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def select(args) -> list[str]:
    """The ops to run; raises UserError naming the option and the choices for an unknown op, size
    or implementation."""
    ops = suite_ops()
    if not ops:
        raise UserError(f"no bench_*.py files in {SUITE}")
    chosen = _csv(args.ops) or list(ops)
    unknown = [o for o in chosen if o not in ops]
    if unknown:
        raise UserError(f"--ops: unknown op(s) {', '.join(unknown)}; available: {', '.join(ops)}")
    backends = _csv(args.backends)
    if backends is not None:
        bad = [b for b in backends if b not in report.KNOWN_IMPLS]
        if bad:
            raise UserError(
                f"--backends: unknown implementation(s) {', '.join(bad)}; known: {', '.join(report.KNOWN_IMPLS)}"
            )
    sizes = _csv(args.sizes)
    if sizes is not None:
        known = {s for op in chosen for s in op_sizes(op)}
        bad = [s for s in sizes if s not in known]
        if bad:
            raise UserError(
                f"--sizes: unknown size(s) {', '.join(bad)} for ops {', '.join(chosen)}; "
                f"available: {', '.join(sorted(known))}"
            )
    return chosen


def compile_rows(args) -> bool:
    """Whether the torch.compile rows run: as asked by --compile/--no-compile; else when
    ``compile`` is among --backends; without --backends, in a full run but not with --quick."""
    if args.compile is not None:
        return bool(args.compile)
    backends = _csv(args.backends)
    return "compile" in backends if backends is not None else not args.quick


def _read_events(path: Path, seen: int) -> tuple[list[dict], int]:
    try:
        with open(path) as f:
            f.seek(seen)
            text = f.read()
    except FileNotFoundError:
        return [], seen
    complete = text[: text.rfind("\n") + 1]
    events = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return events, seen + len(complete.encode())


def run_pytest(args, ops: list[str], out: Path) -> tuple[dict | None, list[dict], int]:
    """Runs the chosen files; returns (pytest-benchmark's JSON or None, the row events, exit code)."""
    from tqdm import tqdm

    env = dict(os.environ)
    for name, value in (
        ("PYADVK_BENCH_SIZES", args.sizes),
        ("PYADVK_BENCH_BACKENDS", args.backends),
        ("PYADVK_BENCH_DEVICE", args.device),
    ):
        if value:
            env[name] = value
    env["PYADVK_BENCH_QUICK"] = "1" if args.quick else "0"
    env["PYADVK_BENCH_COMPILE"] = "1" if compile_rows(args) else "0"
    # Deprecation notices of torch/triton internals are noise in a benchmark log.
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    files = suite_ops()
    log = out / "pytest.log"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        events_path = Path(tmp) / "events.jsonl"
        env["PYADVK_BENCH_EVENTS"] = str(events_path)
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfE",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::DeprecationWarning",
            "--benchmark-only",
            f"--benchmark-json={raw}",
            f"--rootdir={SUITE.parent}",
            "-o",
            "python_files=bench_*.py",
            *[str(files[o]) for o in ops],
        ]
        print(f"pyadvk bench: running {', '.join(ops)} (pytest's output: {log})", file=sys.stderr)
        events: list[dict] = []
        seen = 0
        bar = None
        with open(log, "w") as logf:
            proc = subprocess.Popen(cmd, cwd=SUITE.parent, env=env, stdout=logf, stderr=subprocess.STDOUT)
            try:
                while True:
                    code = proc.poll()
                    new, seen = _read_events(events_path, seen)
                    for e in new:
                        if e["event"] == "collected":
                            bar = tqdm(total=e["n"], unit="row", file=sys.stderr, desc="benchmark rows")
                        else:
                            events.append(e)
                            if bar is not None:
                                bar.set_postfix_str(e["test"], refresh=False)
                                bar.update(1)
                    if code is not None:
                        break
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:  # interrupted: stop the run too
                    proc.terminate()
                    proc.wait()
                if bar is not None:
                    bar.close()
        data = json.loads(raw.read_text()) if raw.exists() else None
    return data, events, code


def not_run(args, ops: list[str], events: list[dict]) -> list[str]:
    """Lines saying which rows did not run, grouped by op, implementation and reason; and which
    requested implementations none of the chosen ops has."""
    groups: dict[tuple, list[dict]] = {}
    for e in events:
        if e["outcome"] != "passed":
            groups.setdefault((e["file"], e["impl"], e["outcome"], e["reason"]), []).append(e)
    lines = []
    for (file, impl, outcome, reason), es in groups.items():
        what = f"{file.removeprefix('bench_')} {impl or ''}".strip()
        count = f"{len(es)} row{'s' if len(es) > 1 else ''}"
        if outcome == "skipped":
            lines.append(f"skipped  {what} ({count}): {reason}")
        else:
            lines.append(f"FAILED   {what} ({count}): {', '.join(e['test'] for e in es)}")
    present = {e["impl"] for e in events}
    for impl in _csv(args.backends) or []:
        if impl == "compile" and not compile_rows(args):
            lines.append("skipped  compile: torch.compile rows are off (--no-compile)")
        elif impl not in present:
            lines.append(f"skipped  {impl}: not an implementation of {', '.join(ops)} (see benchmarks/README.md)")
    return lines


def run(args) -> int:
    """``pyadvk bench``: see pyadvk/cli/bench.py for the options."""
    if args.list:
        for op in suite_ops():
            print(f"{op}: sizes {', '.join(op_sizes(op)) or '-'}")
        return 0
    ops = select(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, events, code = run_pytest(args, ops, out)
    seconds = time.perf_counter() - t0
    skipped = not_run(args, ops, events)
    if data is None and skipped:
        print("\n".join(["Not run:", *("  " + line for line in skipped)]))
        tail = (out / "pytest.log").read_text().splitlines()[-30:]
        raise UserError(
            f"the benchmark run failed (pytest exit code {code}) and wrote no results; the end of "
            f"{out / 'pytest.log'}:\n" + "\n".join(tail)
        )
    rows = report.rows_from_pytest(data)
    if not rows:
        raise UserError("no benchmark matched the selection (every row was skipped or deselected)")
    result = {
        "machine": report.machine(),
        "selection": {
            "ops": ops,
            "sizes": args.sizes,
            "backends": args.backends,
            "quick": args.quick,
            "compile": compile_rows(args),
        },
        "seconds": seconds,
        "pytest_exit_code": code,
        "not_run": skipped,
        "rows": rows,
    }
    text = report.table(rows)
    m = result["machine"]
    head = f"Machine: {m.get('gpu') or m['cpu']}, torch {m['torch']}; {len(rows)} rows in {seconds:.0f} s"
    _io.save_json(result, out / "bench.json")
    with _io.atomic_open(out / "bench.md") as f:
        f.write(head + "\n\n" + text + "\n")
    plotted = report.plot(rows, str(out / "bench.png"))
    print("\n" + head + "\n\n" + text)
    if skipped:
        print("\n".join(["", "Not run:", *("  " + line for line in skipped)]))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'bench.png'}" if plotted else ""))
    if code not in (0, 5):
        print(f"pyadvk bench: pytest exited with code {code} (failures above; details in {out / 'pytest.log'})")
        return 1
    return 0
