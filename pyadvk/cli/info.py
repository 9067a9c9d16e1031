"""``pyadvk info``: versions, and which backends run here (and why the others do not)."""

from __future__ import annotations

import argparse
import platform

import torch


def describe() -> str:
    import pyadvk
    from pyadvk import _backend, _extension

    lines = [
        f"pyadvk {pyadvk.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.get_num_threads()} CPU threads)",
    ]
    try:
        import triton

        lines.append(
            f"triton {triton.__version__}"
            + (" (interpreter: TRITON_INTERPRET=1)" if _backend.triton_interpreted() else "")
        )
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        lines.append("no CUDA device visible")
    lines.append(f"compiled extension: {_extension.build_info()}")
    lines.append(f"forced backend: {_backend.get_backend()}")
    lines.append("backends:")
    lines += [f"  {status}" for status in _backend.backends().values()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Prints :func:`describe`; returns 0."""
    print(describe())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``pyadvk info``."""
    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(run=run)
