"""Helpers shared by the test files: comparisons with tight tolerances and verbose reports of the
worst mismatches, the runner of a test file on one CPU instruction set, and the random inputs of
the PGD step (the CPU tests and the GPU tests draw the same cases)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from pyadvk.ops import pgd as pgd_ops


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


# ---------------------------------------------------------------------------------------------
# Inputs of the PGD step (tests/test_pgd_ops.py, tests/test_pgd_gpu.py)

PGD_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Shapes no block size divides, a batch of 1, images, flat vectors, one value per sample.
PGD_SHAPES = st.sampled_from(
    [
        (1, 1),
        (1, 7),
        (3, 1),
        (2, 3, 5, 7),
        (5, 3, 4, 4),
        (1, 3, 17, 19),
        (4, 1000),
        (2, 4100),
        (3, 2, 3, 4, 5),
        (7,),
        (2, 16385),
    ]
)


def pgd_inputs(shape, dtype, seed, *, nan_grad=False, zero_grad_sample=False, device="cpu"):
    """[x_adv, x_orig, grad] of ``shape``: x_orig uniform in [0, 1), x_adv within 0.1 of it (in
    the box), grad normal with 5% zeros (``nan_grad``: 10% NaN; ``zero_grad_sample``: the first
    sample's gradient all zero). Drawn on the CPU from ``seed``, then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    x_orig = torch.rand(shape, generator=gen)
    x_adv = (x_orig + 0.1 * (2 * torch.rand(shape, generator=gen) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad[torch.rand(shape, generator=gen) < 0.05] = 0.0
    if nan_grad:
        grad[torch.rand(shape, generator=gen) < 0.1] = math.nan
    if zero_grad_sample:
        grad[0] = 0.0
    return [t.to(dtype=dtype, device=device) for t in (x_adv, x_orig, grad)]


def per_sample(value, batch, seed, device="cpu"):
    """(batch,) float32 values in [0.5, 1.5) * value, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed + 1)
    return value * (0.5 + torch.rand(batch, generator=gen)).to(device)


# hypothesis strategies of one PGD step case; pgd_step_args(**case) makes its inputs
pgd_step_cases = dict(
    shape=PGD_SHAPES,
    dtype=st.sampled_from(PGD_DTYPES),
    norm=st.sampled_from(pgd_ops.NORMS),
    eps=st.sampled_from([0.0, 0.01, 0.05, 0.5, 1e30]),  # 1e30: no projection in effect
    alpha=st.sampled_from([1e-3, 0.02, 0.3]),
    per_sample_eps=st.booleans(),
    per_sample_alpha=st.booleans(),
    box=st.sampled_from([(0.0, 1.0), (0.2, 0.7), (-math.inf, math.inf)]),
    nan_grad=st.booleans(),
    zero_grad_sample=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def pgd_step_args(
    shape,
    dtype,
    norm,
    eps,
    alpha,
    per_sample_eps,
    per_sample_alpha,
    box,
    nan_grad,
    zero_grad_sample,
    seed,
    device="cpu",
):
    """((x_adv, x_orig, grad), keyword arguments of pgd_step) for one case of pgd_step_cases."""
    x_adv, x_orig, grad = pgd_inputs(
        shape, dtype, seed, nan_grad=nan_grad, zero_grad_sample=zero_grad_sample, device=device
    )
    batch = shape[0]
    if per_sample_eps:
        eps = per_sample(eps, batch, seed, device)
    if per_sample_alpha:
        alpha = per_sample(alpha, batch, seed + 7, device)
    return (x_adv, x_orig, grad), dict(eps=eps, alpha=alpha, norm=norm, lower=box[0], upper=box[1])


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """Runs ``pyadvk ARGV`` in this process (``pyadvk.cli.main``) and returns its exit code and what
    it wrote to stderr. Argument errors that argparse turns into SystemExit count as exit codes. An
    exception that escapes ``main`` (what a user would see as a traceback) fails the calling test.
    The user-error tests use it for all but one case per command file, which runs in a fresh
    interpreter (``python -m pyadvk``) to show the user sees one line and no traceback."""
    from pyadvk.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    return code, capsys.readouterr().err


def boundary_rows(
    rows, dims, dtype, seed, *, box=(0.0, 1.0), ties=False, zeros=0.0, faces=0.0, scale=1.0, device="cpu"
):
    """Inputs of the boundary projection (tests/test_boundary_projection*.py): (x, w, b), rows of x
    in the box, normals w, offsets b = scale·√D·N(0, 1) (large scales make the hyperplane miss the
    box). ``ties``: x on 4 levels and w in {±0.5, ±1} (equal breakpoints);
    ``zeros``/``faces``: the share of w set to 0 / of x set to a bound (the last row's w all 0 when
    zeros > 0)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = box
    if ties:
        x = lo + (hi - lo) * torch.randint(0, 4, (rows, dims), generator=gen).double() / 3
        w = torch.tensor([-1.0, -0.5, 0.5, 1.0], dtype=torch.float64)[torch.randint(0, 4, (rows, dims), generator=gen)]
    else:
        x = lo + (hi - lo) * torch.rand(rows, dims, generator=gen, dtype=torch.float64)
        w = torch.randn(rows, dims, generator=gen, dtype=torch.float64)
    on_face = torch.rand(rows, dims, generator=gen) < faces
    upper_face = torch.rand(rows, dims, generator=gen) < 0.5
    x = torch.where(on_face, torch.where(upper_face, hi, lo), x)
    w = torch.where(torch.rand(rows, dims, generator=gen) < zeros, 0.0, w)
    if zeros > 0:
        w[-1] = 0.0
    b = torch.randn(rows, generator=gen, dtype=torch.float64) * scale * math.sqrt(dims)
    return tuple(t.to(dtype=dtype, device=device) for t in (x, w, b))
