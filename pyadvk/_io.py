"""Atomic file output: everything pyadvk writes appears whole or not at all. Each writer writes
to a temporary file in the destination folder and renames it into place (``os.replace`` is atomic
on POSIX and Windows), so an interruption or an error never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Like ``open(path, mode)`` for writing, but the file only appears at ``path`` when the
    ``with`` block ends without an exception."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open is for writing; mode must contain 'w' or 'x', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
