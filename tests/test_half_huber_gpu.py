"""The cuda and triton Half-Huber bodies on a GPU, against the torch reference; opcheck of the GPU
and Triton ops (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.nn.functional import half_huber_relu
from pyadvk.ops import half_huber as hh
from tests.test_half_huber import DELTAS, DTYPES, SHAPES, make, op_body
from tests.utils import assert_matches_reference

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("body", GPU_BACKENDS)
@given(
    shape=st.sampled_from(SHAPES + [(128, 64, 32, 32), (3, 3, 223, 221)]),
    dtype=st.sampled_from(DTYPES + [torch.float64]),
    delta=st.sampled_from(DELTAS),
    seed=st.integers(0, 2**31 - 1),
)
def test_ops_match_reference_on_gpu(body, shape, dtype, delta, seed):
    x, grad, gg = (t.cuda() for t in make(shape, dtype, seed, delta, n=2))
    ops = op_body(body)
    assert_matches_reference(ops.forward(x, delta), hh.half_huber_relu_reference(x, delta), what=f"{body} forward")
    assert_matches_reference(
        ops.backward(grad, x, delta), hh.half_huber_relu_backward_reference(grad, x, delta), what=f"{body} backward"
    )
    got = ops.double_backward(gg, grad, x, delta)
    want = hh.half_huber_relu_double_backward_reference(gg, grad, x, delta)
    assert_matches_reference(got[0], want[0], what=f"{body} double backward (wrt grad)")
    assert_matches_reference(got[1], want[1], what=f"{body} double backward (wrt x)")


@pytest.mark.parametrize("body", GPU_BACKENDS)
def test_gradgradcheck_and_channels_last_on_gpu(body):
    x = (torch.rand(2, 3, 4, 5, dtype=torch.float64, device="cuda") * 2 - 0.5).requires_grad_(True)
    fn = lambda t: half_huber_relu(t, 0.5, backend=body)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    xc = torch.randn(4, 8, 6, 6, device="cuda").contiguous(memory_format=torch.channels_last)
    y = half_huber_relu(xc, 0.5, backend=body)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(y, hh.half_huber_relu_reference(xc, 0.5), what="channels_last")


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_gpu_ops(suffix, requires_grad):
    x, g, gg = (t.cuda().requires_grad_(requires_grad) for t in make((2, 3, 4, 5), torch.float32, 1, 0.5, n=2))
    ops = torch.ops.pyadvk
    torch.library.opcheck(getattr(ops, f"half_huber_relu{suffix}").default, (x, 0.5))
    torch.library.opcheck(getattr(ops, f"half_huber_relu_backward{suffix}").default, (g, x, 0.5))
    torch.library.opcheck(getattr(ops, f"half_huber_relu_double_backward{suffix}").default, (gg, g, x, 0.5))
