"""The cuda and triton bodies of the batched power iteration on a GPU, against the torch
reference, and opcheck of both (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyadvk import models
from pyadvk.lipschitz import model as lip_model
from pyadvk.ops import power_iteration
from tests.test_power_iteration import DTYPES, SHAPES, assert_close_sigma, make_case

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@settings(max_examples=50, deadline=None)
@given(
    shapes=st.lists(st.sampled_from(SHAPES + [(512, 4608), (4097, 3)]), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    n_iters=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_gpu(backend, shapes, dtype, n_iters, seed):
    ws, us = make_case(shapes, dtype, seed, zero=(0,) if len(shapes) > 1 else ())
    ws, us = [w.cuda() for w in ws], [u.cuda() for u in us]
    ref = power_iteration(ws, us, n_iters, backend="torch")
    assert_close_sigma(power_iteration(ws, us, n_iters, backend=backend), ref, f"{backend} {dtype} {shapes}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_resnet18_layers_converge(backend):
    net = models.resnet18().cuda()
    mats = [m.weight.detach().flatten(1) for _, m in lip_model.layers_of(net)]
    us = [torch.randn(m.shape[0], device="cuda") for m in mats]
    sig, us, _ = power_iteration(mats, us, 100, backend=backend)
    exact = torch.stack([torch.linalg.matrix_norm(m.double(), ord=2) for m in mats]).float()
    torch.testing.assert_close(sig, exact, rtol=1e-3, atol=0)


def test_opcheck_gpu():
    ws, us = make_case([(5, 7), (1, 300), (300, 1)], torch.float32, 2)
    ws, us = [w.cuda() for w in ws], [u.cuda() for u in us]
    torch.library.opcheck(torch.ops.pyadvk.power_iteration.default, (ws, us, 2))
    torch.library.opcheck(torch.ops.pyadvk.power_iteration_triton.default, (ws, us, 2))
