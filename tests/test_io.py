"""Atomic writes (pyadvk._io): whole or nothing, the permissions open() gives, "x" never
overwrites, and temporary files of killed writers are cleaned up (issue 13, item 11)."""

from __future__ import annotations

import os
import stat
import time

import pytest

from pyadvk._io import STALE_SECONDS, atomic_open, save_json


def test_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.txt"
    with atomic_open(path) as f:
        f.write("one")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("two")
        raise RuntimeError("interrupted")
    assert path.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"], "a temporary file was left"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_json({"x": 1}, tmp_path / "r.json")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_exclusive_mode_never_overwrites(tmp_path):
    path = tmp_path / "x.txt"
    with atomic_open(path, "x") as f:
        f.write("first")
    with pytest.raises(FileExistsError, match="exists"), atomic_open(path, "x") as f:
        f.write("second")
    # the file appearing while the writer writes is also caught, atomically
    other = tmp_path / "y.txt"
    with pytest.raises(FileExistsError), atomic_open(other, "x") as f:
        f.write("late")
        other.write_text("someone else")
    assert path.read_text() == "first" and other.read_text() == "someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt", "y.txt"]


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    fresh = tmp_path / ".checkpoint.pt.def456.tmp"  # a writer still at work
    unrelated = tmp_path / ".other.pt.abc123.tmp"
    for p in (stale, fresh, unrelated):
        p.write_bytes(b"partial")
    old = time.time() - 2 * STALE_SECONDS
    os.utime(stale, (old, old))
    os.utime(unrelated, (old, old))
    with atomic_open(path, "wb") as f:
        f.write(b"whole")
    assert not stale.exists()
    assert fresh.exists() and unrelated.exists()
    assert path.read_bytes() == b"whole"
