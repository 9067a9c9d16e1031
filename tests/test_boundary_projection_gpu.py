"""The cuda and triton bodies of the boundary projection on a GPU, against the torch reference
(skipped without a GPU): fresh random cases up to ImageNet-sized rows, the closed form where the box
is inactive, determinism, opcheck of the CUDA op and of the Triton op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.ops import boundary_projection
from pyadvk.ops.boundary_projection import boundary_projection_reference
from tests.utils import assert_matches_reference, boundary_rows

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]
NORMS = ("l2", "linf")


def assert_close_to_reference(out, ref, what):
    if ref.dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True, msg=what)
    else:
        assert_matches_reference(out, ref, what=what)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@given(
    rows=st.integers(1, 9),
    dims=st.sampled_from([1, 7, 255, 257, 3072, 150528]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm=st.sampled_from(NORMS),
    ties=st.booleans(),
    zeros=st.sampled_from([0.0, 0.3]),
    faces=st.sampled_from([0.0, 0.2, 1.0]),
    scale=st.sampled_from([0.0, 0.05, 0.5, 3.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gpu_bodies_match_reference(backend, rows, dims, dtype, norm, ties, zeros, faces, scale, seed):
    x, w, b = boundary_rows(rows, dims, dtype, seed, ties=ties, zeros=zeros, faces=faces, scale=scale, device="cuda")
    ref = boundary_projection_reference(x, w, b, 0.0, 1.0, norm)
    out = boundary_projection(x, w, b, 0.0, 1.0, norm, backend=backend)
    assert_close_to_reference(out, ref, f"{backend} {norm} {dtype} ({rows}, {dims})")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_gpu_closed_form_and_determinism(backend, norm):
    x, w, b = boundary_rows(90, 3072, torch.float64, 3, box=(-1e6, 1e6), zeros=0.2, device="cuda")
    x = x * 1e-6
    r = (w * x).sum(dim=1, keepdim=True) + b[:, None]
    dual = (w * w).sum(dim=1, keepdim=True) if norm == "l2" else w.abs().sum(dim=1, keepdim=True)
    expected = -r * (w if norm == "l2" else torch.sign(w)) / dual.clamp_min(1e-300)
    out = boundary_projection(x, w, b, -1e6, 1e6, norm, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, boundary_projection(x, w, b, -1e6, 1e6, norm, backend=backend))


@pytest.mark.parametrize("norm", NORMS)
def test_opcheck_cuda_and_triton_ops(norm):
    x, w, b = boundary_rows(4, 9, torch.float32, 1, zeros=0.2, device="cuda")
    torch.library.opcheck(torch.ops.pyadvk.boundary_projection.default, (x, w, b, 0.0, 1.0, norm))
    torch.library.opcheck(torch.ops.pyadvk.boundary_projection_triton.default, (x, w, b, 0.0, 1.0, norm))
