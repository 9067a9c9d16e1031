"""Loading of the compiled extension ``pyadvk._C`` (C++ CPU bodies, and CUDA bodies when built).

The extension registers its kernels with the dispatcher (``TORCH_LIBRARY_IMPL(pyadvk, CPU/CUDA)``)
when it is loaded; the schemas themselves are declared from Python (:mod:`pyadvk.ops._library`), so
every op exists whether or not the library is there. A missing or broken library never breaks
``import pyadvk``: it is reported once, with the reason, and the dispatcher falls back to other
bodies.

Environment:

* ``PYADVK_NO_EXTENSION=1``: do not load the compiled library at all (the cpp/cuda bodies become
  unavailable), e.g. to test the fallbacks.
* ``PYADVK_JIT=1``: when the built library is missing, compile it now from ``csrc/`` with
  ``torch.utils.cpp_extension.load`` (ninja, cached in ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import glob
import os
import warnings
from types import ModuleType

import torch

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_SOURCE_ROOT, "csrc")

_module: ModuleType | None = None
_reason: str = "not loaded yet"
_loaded = False


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    if not sources:
        raise ImportError(f"PYADVK_JIT=1 but no C++ sources were found under {_CSRC}")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]  # setup.py says why
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
        cflags.append("-DPYADVK_WITH_CUDA")
    return load(
        name="pyadvk_C_jit",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-DPYADVK_WITH_CUDA", "--expt-relaxed-constexpr", "--fmad=false"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[_CSRC],
        with_cuda=with_cuda,
    )


def load() -> ModuleType | None:
    """Load the compiled library once; returns it, or None (see :func:`reason`)."""
    global _module, _reason, _loaded
    if _loaded:
        return _module
    _loaded = True
    if os.environ.get("PYADVK_NO_EXTENSION") == "1":
        _reason = "extension disabled by PYADVK_NO_EXTENSION=1"
        return None
    try:
        from pyadvk import _C as module  # type: ignore[attr-defined]
    except ImportError as exc:
        if os.environ.get("PYADVK_JIT") == "1":
            try:
                module = _jit_build()
            except Exception as jit_exc:  # compiler missing, build error: report, never raise
                _reason = f"extension not built and JIT compilation failed: {jit_exc}"
                warnings.warn(f"pyadvk: {_reason}; using the torch/triton bodies", stacklevel=2)
                return None
        else:
            _reason = (
                f"extension not built ({exc}); install with `pip install --no-build-isolation -e .`"
                " or set PYADVK_JIT=1 to compile it on import"
            )
            warnings.warn(f"pyadvk: {_reason}. Falling back to the torch/triton bodies.", stacklevel=2)
            return None
    _module = module
    _reason = ""
    return module


def reason() -> str:
    """Why the library is not loaded ('' when it is)."""
    load()
    return _reason


def compiled_with_cuda() -> bool:
    module = load()
    return bool(module is not None and module.compiled_with_cuda())


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``pyadvk::<op>`` has a compiled kernel for ``dispatch_key`` ('CPU' or 'CUDA')."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyadvk::{op}", dispatch_key)


def build_info() -> str:
    module = load()
    if module is None:
        return f"not loaded: {_reason}"
    return module.build_info()
