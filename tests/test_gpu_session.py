"""benchmarks/gpu_session.py, the one-call device run: stages run in order, each leaves its file
(at most 8), a stage that fails, raises or runs out of time does not stop the next, the output
ends with every stage's summary; and its CPU mode runs the real stages end to end."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_session as gs


def _sh_stage(name: str, script: str, limit_s: float = 30.0) -> gs.Stage:
    def run(session: gs.Session, timeout_s: float) -> gs.Outcome:
        log = session.path(f"{name}.txt")
        status = session.shell(["sh", "-c", script], log, timeout_s)
        return gs.Outcome(status, [f"{name} printed: {log.read_text().splitlines()[-1]}"])

    return gs.Stage(name, f"{name}.txt", limit_s, run)


def _raising(session: gs.Session, timeout_s: float) -> gs.Outcome:
    raise RuntimeError("the stage broke")


def test_stages_run_in_order_and_survive_failures(tmp_path, capsys):
    stages = [
        _sh_stage("first", "echo one"),
        _sh_stage("broken", "echo two; exit 3"),
        # SIGINT first (pytest prints its failures on it); the shell reports it and exits
        _sh_stage("slow", "trap 'echo interrupted; exit 130' INT; echo started; sleep 30 & wait", limit_s=1.0),
        gs.Stage("raises", "raises.json", 30.0, _raising),
        _sh_stage("last", "echo done"),
    ]
    session = gs.Session(tmp_path, sys.executable, cpu=False, deadline=time.monotonic() + 60)
    t0 = time.monotonic()
    summaries = gs.run_stages(session, stages)
    assert time.monotonic() - t0 < 20  # the slow stage was stopped, not waited for
    assert [(name, o.status) for name, o, _ in summaries] == [
        ("first", "ok"),
        ("broken", "failed (exit 3)"),
        ("slow", "timed out after 1 s"),
        ("raises", "error: RuntimeError: the stage broke"),
        ("last", "ok"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([s.file for s in stages] + ["session.txt"])
    slow = (tmp_path / "slow.txt").read_text()
    assert "interrupted" in slow and "stopped after 1 s" in slow
    assert json.loads((tmp_path / "raises.json").read_text())["status"] == "error: RuntimeError: the stage broke"
    session_txt = (tmp_path / "session.txt").read_text()
    heads = [line for line in session_txt.splitlines() if line.startswith("== ")]
    assert [h.split(":")[0][3:] for h in heads] == ["first", "broken", "slow", "raises", "last"]
    assert "broken printed: two" in session_txt and "last printed: done" in session_txt
    summary = gs.final_summary(summaries, t0).splitlines()
    assert summary[0].startswith("== gpu_session summary")
    assert summary[1:6] == [f"{n}: {o.status} ({s:.0f} s)" for n, o, s in summaries]
    assert summary[-2:] == ["-- last", "last printed: done"]
    assert "== first: ok" in capsys.readouterr().out  # printed as each stage ends


def test_stage_past_the_budget_is_skipped_and_says_so(tmp_path):
    session = gs.Session(tmp_path, sys.executable, cpu=True, deadline=time.monotonic() + 1)
    ((name, outcome, _),) = gs.run_stages(session, [gs.Stage("bench-x", "bench-x.json", 60, _raising)])
    assert outcome.status.startswith("skipped:")
    assert json.loads((tmp_path / "bench-x.json").read_text())["stage"] == "bench-x"


def test_the_session_fits_the_device_tool():
    stages = gs.stages()
    files = [s.file for s in stages]
    assert len(set(files)) == len(files) <= gs.MAX_FILES
    names = [s.name for s in stages]
    assert names[:2] == ["preflight", "tests-bodies"] and names[-1] == "tests-rest"
    ops = ("pgd_step", "attack", "power_iteration", "channel_stats", "autoattack")
    assert names[2:-1] == [f"bench-{op}" for op in ops]
    # the GPU limits: build and body tests first, the whole run inside the device's 10 minutes
    assert sum(s.limit_s for s in stages[:2]) < 555 < 600
    with pytest.raises(ValueError, match="distinct files"):
        gs.run_stages(gs.Session(None, "", True, 0.0), [_sh_stage("a", ""), _sh_stage("a", "")])


def test_bench_options_are_declared():
    import importlib

    for op in gs.BENCH_STAGES:
        sizes = importlib.import_module(f"benchmarks.bench_{op}").SIZES
        assert gs.check_bench_options(op, sizes) == []
    assert gs.check_bench_options("pgd_step", {}) == [
        "bench pgd_step (gpu): sizes ['cifar-512', 'imagenet-256'] not in its SIZES []",
        "bench pgd_step (cpu): sizes ['cifar-128'] not in its SIZES []",
    ]


def test_bench_stage_keeps_the_json(tmp_path, monkeypatch):
    """bench-<op>.json is pyadvk bench's JSON plus the stage's status and summary; without one
    (a failed or stopped run) it holds the exit status and the end of the log."""
    fake = tmp_path / "fake_python"
    row = dict(op="pgd_step", case="linf", size="cifar-128", impl="cpp", median_s=2e-4)
    fake.write_text(
        "#!/bin/sh\n"  # called as: python -m pyadvk bench ... --out DIR ...
        'while [ "$1" != "--out" ]; do shift; done\n'
        f"echo '{json.dumps({'rows': [row]})}' > \"$2/bench.json\"\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    session = gs.Session(out, str(fake), cpu=True, deadline=time.monotonic() + 60)
    ((_, outcome, _),) = gs.run_stages(session, [s for s in gs.stages() if s.name == "bench-pgd_step"])
    data = json.loads((out / "bench-pgd_step.json").read_text())
    assert outcome.status == "ok" and data["rows"] == [row]
    assert data["summary"] == outcome.lines == ["pgd_step linf cifar-128 cpp: 0.200 ms"]
    cmd = shlex.split(data["gpu_session"]["command"])
    assert cmd[:3] == [str(fake), "-m", "pyadvk"]
    assert cmd[3:] == gs.bench_args("pgd_step", "cpu", cmd[cmd.index("--out") + 1])
    fake.write_text("#!/bin/sh\necho it broke\nexit 2\n")
    session = gs.Session(tmp_path / "out2", str(fake), cpu=True, deadline=time.monotonic() + 60)
    ((_, outcome, _),) = gs.run_stages(session, [s for s in gs.stages() if s.name == "bench-pgd_step"])
    data = json.loads((tmp_path / "out2" / "bench-pgd_step.json").read_text())
    assert outcome.status == "failed (exit 2)" and "it broke" in data["log_tail"]


def test_summaries():
    text = "tests/a.py::t PASSED\nFAILED tests/a.py::u - boom\n==== 1 failed, 1 passed in 2.0s ====\n"
    assert gs.pytest_summary(text) == ["1 failed, 1 passed in 2.0s", "FAILED tests/a.py::u - boom"]
    assert gs.pytest_summary("collecting ...")[0].startswith("pytest printed no result line")
    row = dict(op="pgd_step", case="linf", size="cifar-512", dtype="float32", impl="cuda", median_s=1e-4)
    row.update(gbps=3000.0, pct_of_copy=81.0, speedup=3.5, baseline="unfused")
    assert gs.bench_summary({"rows": [row], "not_run": ["skipped  x"]}) == [
        "pgd_step linf cifar-512 float32 cuda: 0.100 ms, 3000 GB/s = 81% of copy, 3.50x unfused",
        "not run: skipped  x",
    ]


@pytest.mark.slow
def test_cpu_mode_end_to_end(tmp_path):
    """The real stages on the CPU: the preflight (imports every module the session needs and
    checks every benchmark stage's arguments with pyadvk bench's own parser, its sizes and its
    implementations) and the last test stage (the GPU tests are collected and skipped, which
    proves they import). The benchmark stages are ``pyadvk bench`` runs of a minute each here;
    their code path is test_bench_stage_keeps_the_json's."""
    out = tmp_path / "out"
    stages = ("preflight", "tests-rest")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "--cpu", "--out", str(out), "--stages", ",".join(stages)],
        cwd=gs.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["session.txt", "tests-rest.txt"]
    session_txt = (out / "session.txt").read_text()
    assert "imports: " in session_txt and "problem" not in session_txt, session_txt[-3000:]
    assert "backends:" in session_txt  # pyadvk info
    heads = [line.split(":")[0][3:] for line in session_txt.splitlines() if line.startswith("== ")]
    assert heads == list(stages)
    rest = (out / "tests-rest.txt").read_text().splitlines()
    assert rest[-2].startswith("== tests-rest: ok") and " skipped, " in rest[-1] and "failed" not in rest[-1]
    lines = proc.stdout.splitlines()
    last = lines[next(i for i, x in enumerate(lines) if x.startswith("== gpu_session summary")) :]
    assert [x.split(" (")[0] for x in last[1:3]] == ["preflight: ok", "tests-rest: ok"]
    assert last[-1] == rest[-1]  # the output ends with the last stage's summary
