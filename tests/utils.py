"""Comparison helpers: tight tolerances, verbose reports of the worst mismatches."""

from __future__ import annotations

import torch


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values around each value of ``t`` (float32 result)."""
    info = torch.finfo(dtype)
    a = t.float().abs()
    normal = info.eps * torch.exp2(torch.floor(torch.log2(a.clamp_min(info.tiny))))
    return torch.where(a >= info.tiny, normal, torch.full_like(a, info.eps * info.tiny))


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, *, what: str = "") -> None:
    """float32: max |out - ref| <= 1e-6; float16/bfloat16: within one unit in the last place."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    o, r = out.float(), ref.float()
    both_nan = torch.isnan(o) & torch.isnan(r)
    diff = torch.where(both_nan, 0.0, (o - r).abs())
    if ref.dtype == torch.float32:
        tol = torch.full_like(diff, 1e-6)
    else:
        tol = ulp(torch.maximum(o.abs(), r.abs()), ref.dtype)
    bad = ~(diff <= tol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = "\n".join(
            f"  at {tuple(i)}: got {o[tuple(i)].item()!r}, expected {r[tuple(i)].item()!r}, "
            f"|diff| {diff[tuple(i)].item():.3g} > tol {tol[tuple(i)].item():.3g}"
            for i in idx
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values off (max |diff| {diff.max().item():.3g})\n{rows}"
        )


ISA_ORDER = ["default", "avx2", "avx512"]


def run_on_cpu_isa(isa: str, test_file: str, selection: str, *, threads=(None,)) -> None:
    """Runs the tests of ``test_file`` matching ``-k selection`` in a fresh process on the cpp
    hot loops compiled for ``isa`` (PYADVK_CPU_ISA; each loop is compiled once per instruction
    set), once per entry of ``threads`` (OMP_NUM_THREADS; None leaves it). Skips when this CPU
    does not support ``isa``."""
    import os
    import subprocess
    import sys

    import pytest

    from pyadvk import _extension

    best = _extension.load().cpu_isa()
    if ISA_ORDER.index(isa) > ISA_ORDER.index(best):
        pytest.skip(f"this CPU supports at most {best}")
    for n in threads:
        env = {**os.environ, "PYADVK_CPU_ISA": isa}
        if n is not None:
            env["OMP_NUM_THREADS"] = str(n)
        code = "import pyadvk; print(pyadvk._extension.load().cpu_isa())"
        assert (
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
            == isa
        )
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-4000:]
        assert " passed" in out.stdout, out.stdout[-4000:]
