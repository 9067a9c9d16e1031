"""Backend discovery, forcing, fallbacks, and the info command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pyadvk
from pyadvk.ops import pgd as pgd_ops
from pyadvk.ops import pgd_step


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYADVK_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_backends_report_every_backend_with_a_reason():
    status = pyadvk.backends()
    assert list(status) == ["cuda", "triton", "cpp", "torch"]
    assert status["torch"].available and "cpu" in status["torch"].devices
    for s in status.values():
        assert s.available == bool(s.devices)
        assert s.available or s.reason, f"{s.name} is unavailable without a reason"
    if not torch.cuda.is_available():
        assert not status["cuda"].available
        assert "cuda" not in status["triton"].devices


def test_auto_picks_cpp_on_cpu_when_built():
    expected = "cpp" if not pgd_ops.STEP.reason("cpp", "cpu") else "torch"
    assert pyadvk._backend.resolve(pgd_ops.STEP, torch.device("cpu")) == expected


def test_set_backend_and_keyword():
    x = torch.rand(2, 5)
    pyadvk.set_backend("torch")
    assert pyadvk.get_backend() == "torch"
    assert pyadvk._backend.resolve(pgd_ops.STEP, x.device) == "torch"
    assert pyadvk._backend.resolve(pgd_ops.STEP, x.device, "auto") != "cuda"
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, cpp, torch; got 'gpu'"):
        pyadvk.set_backend("gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        pgd_step(x, x, x, eps=0.1, alpha=0.1, backend="fast")


def test_forcing_an_unavailable_backend_lists_every_reason():
    x = torch.rand(2, 5)
    with pytest.raises(pyadvk.BackendUnavailableError) as info:
        pgd_step(x, x, x, eps=0.1, alpha=0.1, backend="cuda")
    message = str(info.value)
    assert "backend 'cuda' cannot run pgd_step on a cpu tensor" in message
    for name in pyadvk.BACKENDS:
        assert f"\n  {name}: " in message
    assert "runs on CUDA tensors only" in message


def test_environment_variable_forces_a_backend():
    out = _python("import pyadvk; print(pyadvk.get_backend())", PYADVK_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    # a bad value does not break the import (a warning), but every call that would use it raises
    out = _python(
        "import pyadvk\ntry:\n    pyadvk.get_backend()\nexcept ValueError as e:\n    print(e)",
        PYADVK_BACKEND="nonsense",
    )
    assert out.returncode == 0 and "PYADVK_BACKEND must be one of" in out.stderr
    assert "PYADVK_BACKEND must be one of" in out.stdout


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pyadvk\n"
        "    x = torch.rand(2, 3)\n"
        "    y = pyadvk.ops.pgd_step(x, x, torch.randn(2, 3), eps=0.1, alpha=0.05)\n"
        "    y = pyadvk.ops.pgd_step(x, x, torch.randn(2, 3), eps=0.1, alpha=0.05)\n"
        "print(sum('pyadvk' in str(m.message) for m in w))\n"
        "print(pyadvk.backends()['cpp'].reason)\n"
        "try:\n"
        "    pyadvk.ops.pgd_step(x, x, x, eps=0.1, alpha=0.1, backend='cpp')\n"
        "except pyadvk.BackendUnavailableError as e:\n"
        "    print('raised', 'cpp: C++ extension disabled' in str(e))\n"
    )
    out = _python(code, PYADVK_NO_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    count, reason, raised = out.stdout.strip().splitlines()
    assert count == "0"  # disabled on purpose: nothing to warn about
    assert "PYADVK_NO_EXTENSION=1" in reason
    assert raised == "raised True"


def test_unbuilt_extension_warns_once():
    """An install whose extension was never built: import works, one warning, torch bodies run."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['pyadvk._C'] = None  # makes `from pyadvk import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pyadvk\n"
        "    x = torch.rand(2, 3)\n"
        "    pyadvk.ops.pgd_step(x, x, torch.randn(2, 3), eps=0.1, alpha=0.05)\n"
        "    pyadvk.ops.pgd_step(x, x, torch.randn(2, 3), eps=0.1, alpha=0.05)\n"
        "msgs = [str(m.message) for m in w if 'pyadvk' in str(m.message)]\n"
        "print(len(msgs)); print(msgs[0])\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    count, message = out.stdout.strip().splitlines()[:2]
    assert count == "1"
    assert "extension not built" in message and "Falling back" in message


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pyadvk", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"torch {torch.__version__}" in out.stdout
    for name in pyadvk.BACKENDS:
        assert f"  {name}: " in out.stdout


def _spy_bodies(monkeypatch):
    """Records each call of the torch body of the linf pgd_step."""
    ran = []
    real_torch = pgd_ops._STEP_REFERENCE["linf"]

    def torch_spy(*args):
        ran.append("torch")
        return real_torch(*args)

    monkeypatch.setitem(pgd_ops._STEP_REFERENCE, "linf", torch_spy)
    return ran


def test_compiled_function_follows_set_backend(monkeypatch):
    """A function compiled under one backend choice recompiles when set_backend changes it: the
    forced backend is a guarded input, not a constant frozen at trace time (issue 15, item 4)."""
    if not pyadvk.backends()["cpp"].available:
        pytest.skip("the C++ extension is not built")
    torch._dynamo.reset()
    x, g = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def step(x, g):
        return pgd_step(x, x, g, eps=0.1, alpha=0.05)

    compiled = torch.compile(step, backend="eager")
    previous = pyadvk.get_backend()
    try:
        pyadvk.set_backend("torch")
        ran = _spy_bodies(monkeypatch)
        compiled(x, g)
        assert ran == ["torch"]
        pyadvk.set_backend("cpp")
        ran.clear()
        got = compiled(x, g)
        assert ran == [], "set_backend('cpp') after compiling still ran the torch body"
        torch.testing.assert_close(got, step(x, g))
        # a backend that cannot run (cuda on a CPU tensor) raises the same error as eager
        pyadvk.set_backend("cuda")
        with pytest.raises(pyadvk.BackendUnavailableError) as eager:
            step(x, g)
        with pytest.raises(pyadvk.BackendUnavailableError) as traced:
            compiled(x, g)
        assert str(traced.value) == str(eager.value)
    finally:
        pyadvk.set_backend(previous)
        torch._dynamo.reset()
