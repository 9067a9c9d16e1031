"""Atomic file output: everything pyadvk writes appears whole or not at all. Each writer writes
to a temporary file in the destination folder and renames it into place (``os.replace`` is atomic
on POSIX and Windows), so an interruption or an error never leaves a half-written file.

The file gets the permissions ``open()`` would give it (0666 less the umask), ``mode="x"`` refuses
an existing file (checked before writing, and again atomically when the file is put in place), and
temporary files left by killed writers of the same path are removed once a write succeeds."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

# A temporary file of another writer of the same path that has not changed for this long belongs
# to a writer that was killed (a live one writes, or renames its file away, well within it).
STALE_SECONDS = 600.0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale(folder: str, base: str, mine: str) -> None:
    now = time.time()
    for old in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*.tmp")):
        if old == mine:
            continue
        with contextlib.suppress(OSError):
            if now - os.stat(old).st_mtime > STALE_SECONDS:
                os.unlink(old)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Like ``open(path, mode)`` for writing, but the file only appears at ``path`` when the
    ``with`` block ends without an exception. ``"x"`` modes raise FileExistsError if ``path``
    exists (before anything is written, and atomically when the file is put in place)."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open is for writing; mode must contain 'w' or 'x', got {mode!r}")
    exclusive = "x" in mode
    path = os.fspath(path)
    if exclusive and os.path.lexists(path):
        raise FileExistsError(f"{path!r} exists (mode {mode!r} writes only new files)")
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path appeared meanwhile; never overwrites
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _remove_stale(folder, base, tmp)


class CorruptFileError(ValueError):
    """A file pyadvk reads is damaged: not the archive ``torch.save`` / ``torch.jit.save`` write,
    truncated, or with an entry whose CRC-32 does not match its bytes."""


def check_archive(path: str | os.PathLike, what: str = "file") -> None:
    """Checks the integrity of a zip archive as ``torch.save`` and ``torch.jit.save`` write them:
    readable directory, every entry's CRC-32 matching its bytes. Raises :class:`CorruptFileError`
    naming the file and the first damaged entry. A file that is not a zip archive at all is left to
    the caller (torch's legacy format has no checksum)."""
    import zipfile

    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CorruptFileError(f"{what} {path!r} is corrupted: its zip archive does not read ({exc})") from exc
    if bad is not None:
        raise CorruptFileError(
            f"{what} {path!r} is corrupted: the CRC-32 of its entry {bad!r} does not match its bytes "
            "(the file was damaged or changed after it was written)"
        )


def save_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
        f.write("\n")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """Saves a matplotlib figure atomically (format from the file name) and closes it."""
    import matplotlib.pyplot as plt

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=fmt, **kwargs)
    finally:
        plt.close(fig)
