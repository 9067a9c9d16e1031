"""Every body of the boundary projection against the torch reference, on fresh random inputs
(odd D, one row, breakpoint ties, zeros in w, rows whose hyperplane misses the box, points on the
box faces, both norms, float32 and float64); the closed forms where the box is inactive; opcheck of
the compiled CPU op; every bad-input path.

Tolerances: float32 results as tests.utils (1e-6 absolute: every body computes in float64 and
rounds δ once, so they differ by at most an ulp of δ); float64 results 1e-12 (the bodies' float64
sums run in another order than the reference's sorted cumulative sums).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.ops import boundary_projection
from pyadvk.ops.boundary_projection import BOUNDARY_PROJECTION, boundary_projection_reference
from tests.conftest import available
from tests.utils import assert_matches_reference, boundary_rows

BACKENDS = available(BOUNDARY_PROJECTION, "cpu")
FAST_BODIES = [b for b in BACKENDS if b not in ("torch", "triton")]  # the compiled CPU body
NORMS = ("l2", "linf")
BOXES = [(0.0, 1.0), (-1.0, 1.0), (0.3, 0.7)]


def assert_close_to_reference(out, ref, what):
    if ref.dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True, msg=what)
    else:
        assert_matches_reference(out, ref, what=what)


row_cases = dict(
    rows=st.integers(1, 5),
    dims=st.sampled_from([1, 2, 7, 33, 65, 257, 4099]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm=st.sampled_from(NORMS),
    box=st.sampled_from(BOXES),
    ties=st.booleans(),
    zeros=st.sampled_from([0.0, 0.3]),
    faces=st.sampled_from([0.0, 0.2, 1.0]),
    scale=st.sampled_from([0.0, 0.05, 0.5, 3.0, 100.0]),  # 0: r = b·0 + w·x; 100: mostly misses the box
    seed=st.integers(0, 2**31 - 1),
)


@pytest.mark.skipif(not FAST_BODIES, reason="the cpp body is not built")
@given(**row_cases)
def test_bodies_match_reference(rows, dims, dtype, norm, box, ties, zeros, faces, scale, seed):
    x, w, b = boundary_rows(rows, dims, dtype, seed, box=box, ties=ties, zeros=zeros, faces=faces, scale=scale)
    ref = boundary_projection_reference(x, w, b, *box, norm)
    for backend in FAST_BODIES:
        out = boundary_projection(x, w, b, *box, norm, backend=backend)
        assert_close_to_reference(out, ref, f"{backend} {norm} {dtype} ({rows}, {dims})")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
@given(
    dims=st.sampled_from([1, 5, 19]),  # the interpreter runs ~0.1 s per probe: tiny rows
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm=st.sampled_from(NORMS),
    ties=st.booleans(),
    zeros=st.sampled_from([0.0, 0.3]),
    faces=st.sampled_from([0.0, 0.2]),
    scale=st.sampled_from([0.05, 0.5, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference(dims, dtype, norm, ties, zeros, faces, scale, seed):
    x, w, b = boundary_rows(2, dims, dtype, seed, ties=ties, zeros=zeros, faces=faces, scale=scale)
    ref = boundary_projection_reference(x, w, b, 0.0, 1.0, norm)
    out = boundary_projection(x, w, b, 0.0, 1.0, norm, backend="triton")
    assert_close_to_reference(out, ref, f"triton {norm} {dtype} (2, {dims})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_closed_form_where_the_box_is_inactive(backend, norm):
    """Far from the faces: L2 δ = −r·w/‖w‖², L∞ δ = −r·sign(w)/‖w‖₁ (zeros where w = 0)."""
    x, w, b = boundary_rows(3, 9 if backend == "triton" else 41, torch.float64, 7, box=(-1e6, 1e6), zeros=0.2)
    x = x * 1e-6  # near the centre of the box
    r = (w * x).sum(dim=1, keepdim=True) + b[:, None]
    if norm == "l2":
        expected = -r * w / (w * w).sum(dim=1, keepdim=True).clamp_min(1e-300)
    else:
        expected = -r * torch.sign(w) / w.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
    out = boundary_projection(x, w, b, -1e6, 1e6, norm, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out[-1] == 0).all()  # the row with w = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_breakpoints_one_ulp_apart(backend, norm):
    """Breakpoints on consecutive float32 (float64) values, x = 0.5 + k ulp with w = ±1, and |r| set
    to g at the middle of that cluster, at one of its breakpoints, and just past its top: the search
    must isolate segments a few ulp wide."""
    for dtype in (torch.float32, torch.float64):
        dims = 41
        ulp = torch.finfo(dtype).eps / 2  # the spacing of values in [0.5, 1)
        x = (0.5 + ulp * torch.arange(dims, dtype=torch.float64)).to(dtype).repeat(3, 1)
        w = torch.ones(3, dims, dtype=dtype)
        w[1, ::2] = -1.0
        # With r < 0 (s = +1): reach = 1 − x where w > 0, x − 0 where w < 0; |w| = 1, so τ_i = reach.
        xd, wd = x.double(), w.double()
        tau = torch.where(wd > 0, 1 - xd, xd).sort(dim=1).values
        at = torch.stack([tau[0, dims // 2] + ulp / 4, tau[1, dims // 3], tau[2, -1] - ulp])
        target = torch.minimum(at[:, None], tau).sum(dim=1)  # g(at) for v_i = 1 (both norms: w_i² = |w_i| = 1)
        b = (-target - (wd * xd).sum(dim=1)).to(dtype)
        ref = boundary_projection_reference(x, w, b, 0.0, 1.0, norm)
        assert (ref.double().abs().amax(dim=1) >= tau[:, 0]).all()  # τ reached the cluster (|δ_i| = min(τ, τ_i))
        out = boundary_projection(x, w, b, 0.0, 1.0, norm, backend=backend)
        assert_close_to_reference(out, ref, f"{backend} {norm} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_and_leading_dims(backend):
    """A NaN offset or x makes δ NaN where w ≠ 0 and 0 elsewhere; (..., D) batches keep their shape."""
    x, w, b = boundary_rows(6, 5, torch.float32, 3, zeros=0.3)
    b[0] = math.nan
    x[1, 2] = math.nan
    out = boundary_projection(x.view(2, 3, 5), w.view(2, 3, 5), b.view(2, 3), 0.0, 1.0, "l2", backend=backend)
    assert out.shape == (2, 3, 5)
    out = out.view(6, 5)
    for row in (0, 1):
        assert torch.isnan(out[row][w[row] != 0]).all() and (out[row][w[row] == 0] == 0).all()
    assert_matches_reference(out, boundary_projection_reference(x, w, b, 0.0, 1.0, "l2"), what=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_empty(backend, shape):
    x = torch.zeros(shape)
    out = boundary_projection(x, x, torch.zeros(shape[:-1]), 0.0, 1.0, "linf", backend=backend)
    assert out.shape == shape


def test_solution_is_feasible_and_on_the_hyperplane():
    """The reference itself: x + δ in the box, and w·(x + δ) + b = 0 where the hyperplane meets the box."""
    x, w, b = boundary_rows(50, 13, torch.float64, 11, faces=0.2, scale=0.5)
    for norm in NORMS:
        delta = boundary_projection_reference(x, w, b, 0.0, 1.0, norm)
        moved = x + delta
        assert (moved >= -1e-12).all() and (moved <= 1 + 1e-12).all()
        residual = (w * moved).sum(dim=1) + b
        at_bound = ((moved <= 1e-12) | (moved >= 1 - 1e-12) | (w == 0)).all(dim=1)  # missed: all at a bound
        assert ((residual.abs() < 1e-9) | at_bound).all()


@pytest.mark.skipif(not FAST_BODIES, reason="the cpp body is not built")
def test_cpp_is_deterministic_over_thread_counts():
    x, w, b = boundary_rows(37, 301, torch.float32, 5, faces=0.1)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(boundary_projection(x, w, b, 0.0, 1.0, "l2", backend="cpp"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not FAST_BODIES, reason="the cpp body is not built")
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_compiled_cpu_op(norm, dtype):
    x, w, b = boundary_rows(4, 9, dtype, 1, zeros=0.2)
    torch.library.opcheck(torch.ops.pyadvk.boundary_projection.default, (x, w, b, 0.0, 1.0, norm))


# ---------------------------------------------------------------------------------------------
# Bad inputs: the wrapper's checks (every body) and the compiled op's own.


def _rows():
    return boundary_rows(2, 3, torch.float32, 0)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=[[0.5]]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x must be float32 or float64, got torch.int64"),
        (dict(x=torch.zeros(2, 3, dtype=torch.float16)), TypeError, "x must be float32 or float64"),
        (dict(x=torch.tensor(0.5)), ValueError, "x must have at least 1 dim"),
        (dict(w=torch.zeros(2, 4)), ValueError, r"w must have the shape of x \(2, 3\), got \(2, 4\)"),
        (dict(w=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "w must have the dtype of x"),
        (dict(w=torch.zeros(2, 3, device="meta")), ValueError, "w must be on the device of x"),
        (dict(b=torch.zeros(3)), ValueError, r"b must have the shape of x without its last dim \(2,\)"),
        (dict(b=torch.zeros(2, dtype=torch.float64)), TypeError, "b must have the dtype of x"),
        (dict(b=torch.zeros(2, device="meta")), ValueError, "b must be on the device of x"),
        (dict(lower=1.0, upper=0.0), ValueError, "lower must be <= upper, got lower=1.0, upper=0.0"),
        (dict(lower=math.nan), ValueError, "lower must not be NaN"),
        (dict(upper="1"), TypeError, "upper must be a real number"),
        (dict(norm="l1"), ValueError, "norm must be one of 'l2', 'linf'; got 'l1'"),
    ],
)
def test_bad_inputs(change, error, match):
    x, w, b = _rows()
    args = dict(x=x, w=w, b=b, lower=0.0, upper=1.0, norm="l2") | change
    with pytest.raises(error, match=match):
        boundary_projection(**args)


def test_bad_backend():
    x, w, b = _rows()
    with pytest.raises(ValueError, match="backend must be one of"):
        boundary_projection(x, w, b, 0.0, 1.0, "l2", backend="fortran")


@pytest.mark.skipif(not FAST_BODIES, reason="the cpp body is not built")
@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(3), torch.zeros(3), torch.zeros(1), 0.0, 1.0, "l2"), r"x must be \(R, D\) rows"),
        ((torch.zeros(2, 3, dtype=torch.float16),) * 2 + (torch.zeros(2, dtype=torch.float16), 0.0, 1.0, "l2"),
         "x must be float32 or float64"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2), 0.0, 1.0, "l2"),
         "w and b must have the dtype of x"),
        ((torch.zeros(3, 2).t(), torch.zeros(2, 3), torch.zeros(2), 0.0, 1.0, "l2"), "x must be contiguous"),
        ((torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), 0.0, 1.0, "l2"), "w must have the shape of x"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), 0.0, 1.0, "l2"), r"b must have shape \(2,\)"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 1.0, 0.0, "l2"), "lower must be <= upper"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 0.0, 1.0, "l1"), "norm must be 'l2' or 'linf'"),
    ],
)  # fmt: skip
def test_compiled_op_checks(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pyadvk.boundary_projection(*args)


_COMPILE_FOR_GPU = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from pyadvk.kernels.boundary_projection import MAX_PROBES, _kernel

for dtype, l2 in (("*fp32", True), ("*fp64", False)):
    signature = {"x_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "bounds_ptr": "*fp64", "out_ptr": dtype}
    signature |= {"D": "i64", "L2": "constexpr", "BLOCK": "constexpr", "MAX_PROBES": "constexpr"}
    source = ASTSource(_kernel, signature, constexprs={"L2": l2, "BLOCK": 1024, "MAX_PROBES": MAX_PROBES})
    assert "ptx" in compile(source, target=GPUTarget("cuda", 90, 32)).asm
"""


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
def test_triton_kernel_compiles_for_a_gpu():
    """The Triton kernel through Triton's GPU compiler (sm_90, no GPU needed), in a process without
    the interpreter: the interpreter runs the kernel as Python and misses what only the compiler
    checks (loop-carried types, for one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
