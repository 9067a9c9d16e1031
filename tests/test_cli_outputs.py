"""Every command that writes checks its output location before any work (issue 13, item 9): a
parent that is a file, a target that is a folder, a place that cannot be written: one line on
stderr, exit code 2, nothing created."""

from __future__ import annotations

import os
import tempfile

import pytest

import pyadvk.cli.bench
import pyadvk.cli.common
import pyadvk.data
from pyadvk.cli import main

# command -> (its arguments before --out, the first file it writes into the output folder); the
# model and image files do not exist, so a command that reached its work would fail differently
MISSING = "no-such-model.pt"
COMMANDS = {
    "train": (["train", "--data", "digits:8"], "model.pt"),
    "ara": (["ara", "--model", MISSING, "--data", "digits:8"], "ara.json"),
    "eval": (["eval", "--model", MISSING, "--data", "digits:8", "--eps", "0.1"], "evaluation.json"),
    "stats": (["stats", "--model", MISSING, "--data", "digits:8", "--layers", "features.0"], "stats.json"),
    "demo": (["demo", "--device", "cpu"], "results.json"),
    "bench": (["bench"], "bench.json"),
}


def _writable(folder: str) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can create files in: a chmod 555 folder, or (as root, whom permission bits
    do not stop) a system folder that refuses new files."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not _writable(str(folder)):
        yield str(folder)
        folder.chmod(0o755)
        return
    folder.chmod(0o755)
    for candidate in ("/sys", "/proc/self"):
        if os.path.isdir(candidate) and not _writable(candidate):
            yield candidate
            return
    pytest.skip("no folder here refuses new files (root on a writable system)")


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    """Any data loading, model loading or benchmark run means the check came too late."""

    def started(*args, **kwargs):
        raise AssertionError("the command started its work before checking its output")

    monkeypatch.setattr(pyadvk.cli.common, "load_data", started)
    monkeypatch.setattr(pyadvk.cli.common, "load_model", started)
    monkeypatch.setattr(pyadvk.data, "digits", started)
    monkeypatch.setattr(pyadvk.cli.bench, "load_runner", started)


def _fails_cleanly(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _outputs(tmp_path, readonly: str, target_file: str) -> dict[str, tuple[str, str]]:
    """case -> (the --out to give, a word the error must contain)."""
    (tmp_path / "a-file").write_text("x")
    existing = tmp_path / "existing"
    (existing / target_file).mkdir(parents=True)
    return {
        "parent is a file": (str(tmp_path / "a-file" / "out"), "is a file"),
        "output is a file": (str(tmp_path / "a-file"), "is a file"),
        "target is a folder": (str(existing), "is a folder"),
        "read-only": (os.path.join(readonly, "out"), "not writable"),
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", ["parent is a file", "output is a file", "target is a folder", "read-only"])
def test_unwritable_output_fails_first(command, case, tmp_path, readonly_dir, capsys):
    argv, target = COMMANDS[command]
    out, needle = _outputs(tmp_path, readonly_dir, target)[case]
    before = sorted(os.listdir(tmp_path))
    _fails_cleanly([*argv, "--out", out], capsys, f"pyadvk {command}: error: --out", needle)
    assert sorted(os.listdir(tmp_path)) == before


def test_explain_output_file(tmp_path, readonly_dir, capsys):
    argv = ["explain", "--model", MISSING, "--image", "no-such-image.png", "--out"]
    _fails_cleanly([*argv, str(tmp_path)], capsys, "is a folder; give a file name")
    (tmp_path / "a-file").write_text("x")
    _fails_cleanly([*argv, str(tmp_path / "a-file" / "e.png")], capsys, "is a file, not a folder")
    _fails_cleanly([*argv, os.path.join(readonly_dir, "e.png")], capsys, "not writable")


def test_writable_outputs_pass(tmp_path):
    pyadvk.cli.common.check_output_dir("--out", None)
    pyadvk.cli.common.check_output_dir("--out", str(tmp_path), ("model.pt",))
    pyadvk.cli.common.check_output_dir("--out", str(tmp_path / "new" / "deeper"), ("model.pt",))
    pyadvk.cli.common.check_output_file("--out", str(tmp_path / "new" / "e.png"))
    assert os.listdir(tmp_path) == []  # checking creates nothing
