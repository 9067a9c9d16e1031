"""The cuda and triton bodies of the fused APGD step on a GPU, against the torch reference (skipped
without a GPU): fresh random cases, CIFAR and ImageNet sizes, opcheck, no host sync in a loop of
steps nor in the iterations of an APGD run (eager and replayed from CUDA graphs), CUDA-graph
capture, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from pyadvk.ops import apgd_step, apgd_step_
from pyadvk.ops.pgd import NORMS
from tests.test_apgd_ops import assert_in_ball_and_box, make_inputs, per_sample, step_args, step_cases
from tests.utils import assert_matches_reference

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]


def check_gpu_body(backend, tensors, kw, what=""):
    x, x_prev, x_orig, grad = tensors
    ref = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(apgd_step(x, x_prev, x_orig, grad, backend=backend, **kw), ref, what=f"{backend} {what}")
    before = x.clone()
    target = x_prev.clone()
    assert apgd_step_(x, target, x_orig, grad, backend=backend, **kw) is target
    assert_matches_reference(target, ref, what=f"{backend} in place {what}")
    assert torch.equal(x.nan_to_num(), before.nan_to_num()), "the in-place op wrote into x"
    return ref


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@given(**step_cases)
def test_step_matches_reference_on_gpu(backend, **case):
    tensors, kw = step_args(**case, device="cuda")
    check_gpu_body(backend, tensors, kw)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(128, 3, 32, 32), (256, 3, 224, 224), (3, 3, 223, 221)])
def test_large_shapes(backend, dtype, norm, shape):
    tensors = make_inputs(shape, dtype, 0, device="cuda")
    eps = per_sample(8 / 255 if norm == "linf" else 0.5, shape[0], 1, "cuda")
    eta = 2 * eps
    kw = dict(eta=eta, eps=eps, momentum=0.75, norm=norm)
    ref = check_gpu_body(backend, tensors, kw, what=str(shape))
    assert_in_ball_and_box(ref, tensors[2], eps, norm, 0.0, 1.0)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    out = apgd_step(*cl, backend=backend, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(out.contiguous(), ref, what=f"{backend} {shape} channels_last")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_gradient_scale_on_gpu(backend, norm, scale):
    x, x_prev, x_orig, grad = make_inputs((4, 3, 32, 32), torch.float32, 5, device="cuda")
    kw = dict(eta=0.3, eps=0.5, momentum=0.75, norm=norm)
    unit = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(apgd_step(x, x_prev, x_orig, grad * scale, backend=backend, **kw), unit, what=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("where", [0, 1, 2])
def test_nan_in_points_on_gpu(backend, norm, where):
    tensors = make_inputs((3, 3, 8, 8), torch.float32, 4, device="cuda")
    tensors[where][1, 0, 2, 3] = math.nan
    ref = check_gpu_body(backend, tensors, dict(eta=0.05, eps=0.1, norm=norm), what=f"NaN in input {where}")
    assert ref[1, 0, 2, 3].isnan()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck_gpu_ops(norm, inplace, suffix):
    x, x_prev, x_orig, grad = make_inputs((3, 2, 5, 5), torch.float32, 11, device="cuda")
    op = getattr(torch.ops.pyadvk, f"apgd_step_{norm}{suffix}{'_' if inplace else ''}").default
    torch.library.opcheck(op, (x, x_prev, x_orig, grad, 0.05, None, 0.03, None, 0.75, 0.0, 1.0))
    per = torch.rand(3, device="cuda")
    torch.library.opcheck(op, (x, x_prev, x_orig, grad, 0.0, per, 0.0, per + 0.1, 1.0, 0.0, 1.0))


def _loop(backend, norm, x, x_prev, x_orig, grads, eta, eps):
    """Steps as an attack runs them: in place, the two buffers swapped after each step."""
    for g in grads:
        apgd_step_(x, x_prev, x_orig, g, eta=eta, eps=eps, norm=norm, backend=backend, check_values=False)
        x, x_prev = x_prev, x
    return x


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_loop_of_steps_does_not_sync(backend, norm):
    x, x_prev, x_orig, _ = make_inputs((64, 3, 32, 32), torch.float32, 6, device="cuda")
    grads = [torch.randn_like(x) for _ in range(5)]
    eps = per_sample(0.03, 64, 2, "cuda")
    eta = 2 * eps
    expected = _loop("torch", norm, x.clone(), x_prev.clone(), x_orig, grads, eta, eps)
    _loop(backend, norm, x.clone(), x_prev.clone(), x_orig, grads, eta, eps)  # warm-up (compiles Triton)
    torch.cuda.synchronize()
    a, b = x.clone(), x_prev.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _loop(backend, norm, a, b, x_orig, grads, eta, eps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(got, expected, what=f"{backend} five steps")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_graph_capture(backend, norm):
    x, x_prev, x_orig, grad = make_inputs((16, 3, 32, 32), torch.float32, 7, device="cuda")
    eps = per_sample(0.03, 16, 3, "cuda")
    expected = apgd_step(x, x_prev, x_orig, grad, eta=eps, eps=eps, norm=norm, backend="torch")
    target = x_prev.clone()
    apgd_step_(x, target, x_orig, grad, eta=eps, eps=eps, norm=norm, backend=backend)  # warm-up
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        apgd_step_(x, target, x_orig, grad, eta=eps, eps=eps, norm=norm, backend=backend, check_values=False)
    torch.cuda.current_stream().wait_stream(stream)
    target.copy_(x_prev)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(target, expected, what=f"{backend} graph replay")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_compiles_the_step(backend):
    x, x_prev, x_orig, grad = make_inputs((16, 3, 32, 32), torch.float32, 2, device="cuda")

    def two_steps(x, x_prev, x_orig, grad):
        apgd_step_(x, x_prev, x_orig, grad, eta=0.01, eps=0.03, backend=backend)
        return apgd_step(x_prev, x, x_orig, grad * 2, eta=0.1, eps=0.5, norm="l2", backend=backend)

    expected_prev = x_prev.clone()
    expected = two_steps(x, expected_prev, x_orig, grad)
    got_prev = x_prev.clone()
    got = torch.compile(two_steps, fullgraph=True)(x, got_prev, x_orig, grad)
    torch.testing.assert_close(got_prev, expected_prev, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_attack_iterations_do_not_sync(monkeypatch, cuda_graph):
    """After a run has evaluated its start, its iterations and checkpoints run without a host
    sync (set_sync_debug_mode("error") until the run returns); with cuda_graph=True, on a call
    that replays the graphs the first call captured."""
    from pyadvk.attacks import APGD

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10)
    ).cuda()
    images = torch.rand(64, 3, 16, 16, device="cuda")
    with torch.no_grad():
        labels = model(images).argmax(1)  # every image is attacked
    attack = APGD(model, eps=8 / 255, steps=12, cuda_graph=cuda_graph)
    attack(images, labels)  # warm-up; captures the graphs
    begin, run = APGD._begin, APGD._run

    def checked_begin(self, *args):
        begin(self, *args)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def checked_run(self, *args):
        try:
            return run(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(APGD, "_begin", checked_begin)
    monkeypatch.setattr(APGD, "_run", checked_run)
    out = attack(images, labels)
    assert out.shape == images.shape and torch.isfinite(out).all()
