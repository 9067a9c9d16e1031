"""Which op bodies exist on this machine, why the others do not, and the choice for a tensor.

Every op has up to four bodies:

* ``cuda``: the C++/CUDA extension (CUDA tensors);
* ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, slowly);
* ``cpp``: the C++ CPU extension (CPU tensors);
* ``torch``: the plain PyTorch reference, which defines the op and runs everywhere.

The backend used for a call is, in order: the op's ``backend=`` keyword, :func:`set_backend`, the
``PYADVK_BACKEND`` environment variable (read at import), else ``auto``: the fastest body available
for the tensor's device (CUDA: cuda, triton, torch; CPU: cpp, torch — the Triton interpreter is far
too slow to be chosen automatically).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pyadvk import _extension

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")
_CHOICES = ("auto",) + BACKENDS
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on this device; the message lists every backend."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run, and on which device types; ``reason`` says why not."""

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str = ""

    def __str__(self) -> str:
        if self.available:
            return f"{self.name}: available on {', '.join(self.devices)}"
        return f"{self.name}: {self.reason}"


def _check_choice(name: str, argument: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"{argument} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name.lower()


def _from_environment() -> tuple[str, str]:
    """(choice, error): a bad PYADVK_BACKEND must not break ``import pyadvk`` (nor every command
    with a traceback); it is reported once at import and raised, with the same message, by every
    call that would have used it, until :func:`set_backend` replaces it."""
    try:
        return _check_choice(os.environ.get("PYADVK_BACKEND", "auto"), "PYADVK_BACKEND"), ""
    except ValueError as exc:
        import warnings

        warnings.warn(str(exc), stacklevel=2)
        return "auto", str(exc)


_forced, _env_error = _from_environment()


def set_backend(name: str) -> None:
    """Force one backend for every op ('auto' to choose per call again)."""
    global _forced, _env_error
    _forced = _check_choice(name, "backend")
    _env_error = ""


def get_backend() -> str:
    """The backend forced by :func:`set_backend` or ``PYADVK_BACKEND`` ('auto' when none)."""
    if _env_error:
        raise ValueError(_env_error)
    return _forced


_triton_reason: str | None = None


def _triton_import_reason() -> str:
    """'' when Triton and pyadvk's Triton kernels import, else why not (computed once)."""
    global _triton_reason
    if _triton_reason is None:
        try:
            import triton  # noqa: F401

            import pyadvk.kernels  # noqa: F401
        except ImportError as exc:
            _triton_reason = f"not installed ({exc})"
        except Exception as exc:  # a broken triton install must not break pyadvk
            _triton_reason = f"failed to import ({type(exc).__name__}: {exc})"
        else:
            _triton_reason = ""
    return _triton_reason


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _reason_on(backend: str, device_type: str) -> str:
    """'' if ``backend`` can run on ``device_type`` in general (ignoring which op), else why not."""
    if backend == "torch":
        return "no CUDA device visible" if device_type == "cuda" and not torch.cuda.is_available() else ""
    if backend == "cpp":
        if device_type != "cpu":
            return f"runs on CPU tensors only (got a {device_type} tensor)"
        return _extension.reason() and f"C++ {_extension.reason()}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"runs on CUDA tensors only (got a {device_type} tensor)"
        if _extension.reason():
            return _extension.reason()
        if not _extension.compiled_with_cuda():
            return (
                f"extension built without CUDA (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}); rebuild on a machine with a CUDA build of torch and nvcc"
            )
        if not torch.cuda.is_available():
            return "no CUDA device visible"
        return ""
    if backend == "triton":
        why = _triton_import_reason()
        if why:
            return f"triton {why}"
        if device_type == "cuda":
            return "" if torch.cuda.is_available() else "no CUDA device visible"
        if device_type == "cpu":
            if triton_interpreted():
                return ""
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing pyadvk)"
        return f"does not run on {device_type} tensors"
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


_NATIVE_DEVICES = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpp": ("cpu",), "torch": ("cpu", "cuda")}


def backends() -> dict[str, BackendStatus]:
    """Every backend with the device types it can run on here, and why not where it cannot."""
    result = {}
    for name in BACKENDS:
        reasons = {dev: _reason_on(name, dev) for dev in _NATIVE_DEVICES[name]}
        ok = tuple(dev for dev, why in reasons.items() if not why)
        detail = "; ".join(f"{dev}: {why}" for dev, why in reasons.items() if why)
        if len(reasons) == 1:
            detail = next(iter(reasons.values()))
        result[name] = BackendStatus(name, bool(ok), ok, "" if ok else detail)
    return result


@dataclass(frozen=True)
class OpBodies:
    """The bodies an op family has: the names of its compiled ops, whether it has a Triton body."""

    name: str
    native_ops: tuple[str, ...] = ()
    has_triton: bool = True

    def reason(self, backend: str, device_type: str) -> str:
        why = _reason_on(backend, device_type)
        if why or backend in ("torch", "triton"):
            if backend == "triton" and not why and not self.has_triton:
                return f"{self.name} has no Triton body"
            return why
        key = "CPU" if backend == "cpp" else "CUDA"
        missing = [op for op in self.native_ops if not _extension.has_kernel(op, key)]
        if missing:
            return f"the loaded extension has no {key} kernel for pyadvk::{missing[0]}"
        return ""


@torch.compiler.assume_constant_result
def _auto_choice(op: OpBodies, device_type: str) -> str:
    """The fastest body of ``op`` that can run on ``device_type`` (a constant under torch.compile:
    what is built and installed does not change while a process runs)."""
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        if not op.reason(name, device_type):
            return name
    return "torch"


@torch.compiler.assume_constant_result
def _unavailable(op: OpBodies, choice: str, device_type: str) -> bool:
    """Whether a forced ``choice`` cannot run ``op`` (constant under torch.compile, like the above)."""
    return bool(op.reason(choice, device_type))


def resolve(op: OpBodies, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``: forced (argument, set_backend, env) or auto.

    The one resolver of every op. Under ``torch.compile`` the forced choice (``backend=``, or the
    module's ``_forced`` that :func:`set_backend` writes) is read as a guarded input, so a
    function compiled before ``set_backend`` recompiles after it and runs the new body (or raises
    the same error as eager); only what is available on the machine is assumed constant."""
    if backend is None and _env_error:
        raise ValueError(_env_error)
    choice = _forced if backend is None else _check_choice(backend, "backend")
    device_type = device.type
    if choice == "auto":
        return _auto_choice(op, device_type)
    if _unavailable(op, choice, device_type):
        lines = "\n".join(f"  {name}: {op.reason(name, device_type) or 'available'}" for name in BACKENDS)
        raise BackendUnavailableError(
            f"backend {choice!r} cannot run {op.name} on a {device_type} tensor. Backends:\n{lines}"
        )
    return choice
