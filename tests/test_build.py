"""Build checks that need no GPU: every CUDA source compiles with nvcc (compile only), and the
JIT fallback builds and loads the C++ bodies when the installed extension is missing."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME, include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc() -> str | None:
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit): CUDA sources not compile-checked")
@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    assert CUDA_SOURCES, "no CUDA sources found under csrc/cuda"
    includes = include_paths() + [os.path.join(ROOT, "csrc")]
    # A CPU build of torch ships the CUDA headers but not this one generated file.
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in includes):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)

    def compile_one(source: str) -> tuple[str, subprocess.CompletedProcess]:
        obj = tmp_path / (os.path.basename(source) + ".o")
        cmd = [
            _nvcc(),
            "-c",
            source,
            "-o",
            str(obj),
            "-std=c++20",
            "-O1",
            "-arch=sm_90",
            "-DPYADVK_WITH_CUDA",
            "--expt-relaxed-constexpr",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-Xcompiler",
            "-fPIC",
            "-diag-suppress=3306",
        ] + [f"-I{p}" for p in includes]
        return source, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    failures = [f"{os.path.relpath(src, ROOT)}:\n{res.stderr[-4000:]}" for src, res in results if res.returncode]
    assert not failures, "CUDA sources failed to compile:\n" + "\n".join(failures)


@pytest.mark.slow
def test_jit_fallback_compiles_and_loads(tmp_path):
    """With PYADVK_JIT=1 and no installed extension, import compiles csrc/ and the cpp body runs."""
    code = (
        "import sys, torch\n"
        "sys.modules['pyadvk._C'] = None\n"
        "import pyadvk\n"
        "from pyadvk import _extension\n"
        "assert _extension.reason() == '', _extension.reason()\n"
        "assert _extension.load().__name__ == 'pyadvk_C_jit'\n"
        "x = torch.rand(2, 8)\n"
        "g = torch.randn(2, 8)\n"
        "a = pyadvk.ops.pgd_step(x, x, g, eps=0.1, alpha=0.05, backend='cpp')\n"
        "b = pyadvk.ops.pgd_step(x, x, g, eps=0.1, alpha=0.05, backend='torch')\n"
        "assert torch.equal(a, b)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYADVK_JIT": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path), "MAX_JOBS": "2"}
    env.pop("PYADVK_NO_EXTENSION", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-4000:]
