"""The cuda and triton bodies of the batched power iteration on a GPU: against the torch
reference (shapes that exercise the row-split tiles and the warps-per-row tasks), extreme and
non-finite values, convergence at the rate exact arithmetic predicts, no host synchronization with
a cached plan, a second GPU, opcheck, and CUDA-graph capture of a penalty step (skipped without a
GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyadvk
from pyadvk import models
from pyadvk.lipschitz import LipschitzPenalty, SpectralNormState, spectral_norms
from pyadvk.lipschitz import model as lip_model
from pyadvk.ops import power_iteration
from tests.test_power_iteration import DTYPES, SHAPES, assert_close_sigma, make_case, predicted_sigma

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]
# tall (many row chunks per column block), wide with few rows (more than 1024 columns: several
# warps per row), one very wide row, a ResNet-18 layer
GPU_SHAPES = SHAPES + [(512, 4608), (4097, 3), (3, 5000), (9, 2000), (1, 20000), (300, 1025)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@given(
    shapes=st.lists(st.sampled_from(GPU_SHAPES), min_size=1, max_size=6),
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
def test_extreme_and_non_finite_on_gpu(backend):
    """Exact scaling by 2^±100, σ beyond float32 = inf, NaN/inf weights give NaN (as on CPU)."""
    ws, us = make_case([(30, 20), (3, 2000)], torch.float32, 8)
    ws, us = [w.cuda() for w in ws], [u.cuda() for u in us]
    base = power_iteration(ws, us, 3, backend=backend)
    for k in (100, -100):
        scaled = power_iteration([w * 2.0**k for w in ws], us, 3, backend=backend)
        assert torch.equal(scaled[0], base[0] * 2.0**k), k
    s = power_iteration([torch.full((2, 2), 2e38, device="cuda")], [torch.tensor([1.0, 0.0], device="cuda")], 1,
                        backend=backend)[0]  # fmt: skip
    assert s[0] == float("inf")
    for bad in (float("nan"), float("inf")):
        w = ws[0].clone()
        w[2, 3] = bad
        u = us[0].clone()
        u[2] = 0.0
        s, u_out, v = power_iteration([w, ws[1]], [u, us[1]], 2, backend=backend)
        assert s[0].isnan() and v[0].isnan().all() and torch.equal(u_out[0], u) and torch.isfinite(s[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_resnet18_layers_converge(backend):
    """100 iterations on the 21 random ResNet-18 layers give the σ exact arithmetic predicts from
    the same start (predicted_sigma: the SVD and the spectral gaps; random layers have small gaps,
    so σ is still 0.75-1.3% below the norm) to float32 rounding, and never exceed the norm."""
    torch.manual_seed(0)
    net = models.resnet18().cuda()
    mats = [m.weight.detach().flatten(1) for _, m in lip_model.layers_of(net)]
    gen = torch.Generator().manual_seed(0)
    us = [torch.randn(m.shape[0], generator=gen).cuda() for m in mats]
    sig, _, _ = power_iteration(mats, us, 100, backend=backend)
    for i, (w, u) in enumerate(zip(mats, us)):
        expected = predicted_sigma(w.cpu(), (u / u.norm()).cpu(), 100)
        torch.testing.assert_close(sig[i].double().cpu(), expected, rtol=1e-4, atol=0, msg=lambda m, i=i: f"{i}: {m}")
        assert sig[i] <= torch.linalg.matrix_norm(w.double(), ord=2) * (1 + 1e-5)


def _penalty_model():
    torch.manual_seed(1)
    return models.build("small_cnn", in_channels=3, num_classes=10, input_size=16).cuda().train()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_with_a_cached_plan(backend):
    """After a first call (the plan is built), power_iteration, LipschitzPenalty forward+backward
    and spectral_norms(check_values=False) make no host synchronization."""
    pyadvk.set_backend(backend)
    net = _penalty_model()
    pen = LipschitzPenalty(net, (3, 16, 16), n_iters=1, method="reshaped", init_iters=2)
    state = SpectralNormState(torch.Generator().manual_seed(0))
    ws, us = make_case([(30, 20), (3, 2000)], torch.float32, 8)
    ws, us = [w.cuda() for w in ws], [u.cuda() for u in us]
    for _ in range(2):  # plans built, kernels compiled
        pen().backward()
        spectral_norms(net, None, "reshaped", 1, state=state, check_values=False)
        _, us, _ = power_iteration(ws, us, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            pen().backward()
            spectral_norms(net, None, "reshaped", 1, state=state, check_values=False)
            _, us, _ = power_iteration(ws, us, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_gpu(backend):
    """Weights on cuda:1 while cuda:0 is current: the launches run on the weights' device."""
    ws, us = make_case([(40, 30), (5, 3, 3, 3), (3, 2000)], torch.float32, 3)
    ws, us = [w.to("cuda:1") for w in ws], [u.to("cuda:1") for u in us]
    with torch.cuda.device(0):
        ref = power_iteration(ws, us, 3, backend="torch")
        out = power_iteration(ws, us, 3, backend=backend)
    assert out[0].device == torch.device("cuda:1")
    assert_close_sigma(out, ref, f"{backend} on cuda:1")


def test_opcheck_gpu():
    ws, us = make_case([(5, 7), (1, 300), (300, 1), (3, 2000)], torch.float32, 2)
    ws, u = [w.cuda() for w in ws], torch.cat(us).cuda()
    torch.library.opcheck(torch.ops.pyadvk.power_iteration_packed.default, (ws, u, 2))
    torch.library.opcheck(torch.ops.pyadvk.power_iteration_packed_triton.default, (ws, u, 2))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_graph_capture_of_a_penalty_step(backend):
    """A LipschitzPenalty forward+backward captured in a CUDA graph and replayed gives the eager
    step's penalty, gradients and updated vectors."""
    pyadvk.set_backend(backend)
    net = _penalty_model()
    pen = LipschitzPenalty(net, (3, 16, 16), n_iters=1, method="reshaped", init_iters=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: plans, kernels, autograd buffers
            net.zero_grad(set_to_none=True)
            pen().backward()
    torch.cuda.current_stream().wait_stream(side)
    start = copy.deepcopy(pen.state_dict())
    net.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = pen()
        loss.backward()
    pen.load_state_dict(start)
    graph.replay()
    torch.cuda.synchronize()
    replayed = (loss.clone(), [p.grad.clone() for p in net.parameters() if p.grad is not None], pen.state_dict())
    replayed_state = {k: v.clone() for k, v in replayed[2].items()}
    pen.load_state_dict(start)
    net.zero_grad(set_to_none=True)
    eager = pen()
    eager.backward()
    torch.testing.assert_close(replayed[0], eager.detach(), rtol=1e-6, atol=0)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) == len(replayed[1])
    for a, b in zip(replayed[1], grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for key, value in pen.state_dict().items():
        torch.testing.assert_close(replayed_state[key], value, rtol=1e-6, atol=1e-7, msg=key)
