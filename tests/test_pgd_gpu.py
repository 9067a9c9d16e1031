"""The cuda and triton bodies on a GPU, against the torch reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from benchmarks import baselines
from pyadvk.attacks import PGD, PGDL2
from pyadvk.ops import pgd as pgd_ops
from pyadvk.ops import pgd_step, pgd_step_, random_init
from tests.test_pgd_ops import _step_args, make_inputs, step_cases
from tests.utils import assert_matches_reference

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@given(**step_cases)
def test_step_matches_reference_on_gpu(backend, **case):
    (x_adv, x_orig, grad), kw = _step_args(**case, device="cuda")
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(pgd_step(x_adv, x_orig, grad, backend=backend, **kw), ref, what=backend)
    pgd_step_(x_adv, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(x_adv, ref, what=f"{backend} in place")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("shape", [(128, 3, 32, 32), (256, 3, 224, 224), (3, 3, 223, 221)])
def test_large_shapes(backend, dtype, norm, shape):
    x_adv, x_orig, grad = make_inputs(shape, dtype, 0, device="cuda")
    ref = pgd_step(x_adv, x_orig, grad, eps=0.03, alpha=0.01, norm=norm, backend="torch")
    out = pgd_step(x_adv, x_orig, grad, eps=0.03, alpha=0.01, norm=norm, backend=backend)
    assert_matches_reference(out, ref, what=f"{backend} {shape}")
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_adv, x_orig, grad)]
    out = pgd_step(*cl, eps=0.03, alpha=0.01, norm=norm, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(out.contiguous(), ref, what=f"{backend} {shape} channels_last")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_random_init_on_gpu(backend, norm):
    x = torch.rand(8, 3, 32, 32, device="cuda")
    ref = random_init(x, eps=0.1, norm=norm, generator=torch.Generator("cuda").manual_seed(0), backend="torch")
    out = random_init(x, eps=0.1, norm=norm, generator=torch.Generator("cuda").manual_seed(0), backend=backend)
    assert_matches_reference(out, ref, what=f"{backend} random_init")


@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck_gpu_ops(norm, inplace, suffix):
    x_adv, x_orig, grad = make_inputs((3, 2, 5, 5), torch.float32, 11, device="cuda")
    op = getattr(torch.ops.pyadvk, f"pgd_step_{norm}{suffix}{'_' if inplace else ''}").default
    torch.library.opcheck(op, (x_adv, x_orig, grad, 0.05, 0.01, None, None, 0.0, 1.0))
    per = torch.rand(3, device="cuda")
    torch.library.opcheck(op, (x_adv, x_orig, grad, 0.0, 0.0, per, per + 0.1, 0.0, 1.0))


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck_random_init_gpu(suffix):
    x = torch.rand(2, 3, 4, 4, device="cuda")
    op = getattr(torch.ops.pyadvk, f"random_init_linf{suffix}").default
    torch.library.opcheck(op, (x, torch.rand_like(x), 0.1, None, 0.0, 1.0))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_compiles_the_step(backend):
    x_adv, x_orig, grad = make_inputs((16, 3, 32, 32), torch.float32, 2, device="cuda")

    def step(x_adv, x_orig, grad):
        pgd_step_(x_adv, x_orig, grad, eps=0.03, alpha=0.01, backend=backend)
        return pgd_step(x_adv, x_orig, grad, eps=0.5, alpha=0.1, norm="l2", backend=backend)

    expected_adv = x_adv.clone()
    expected = step(expected_adv, x_orig, grad)
    got_adv = x_adv.clone()
    got = torch.compile(step, fullgraph=True)(got_adv, x_orig, grad)
    torch.testing.assert_close(got_adv, expected_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cls, norm, eps, alpha", [(PGD, "linf", 8 / 255, 2 / 255), (PGDL2, "l2", 0.5, 0.1)])
def test_attacks_match_torchattacks_on_gpu(backend, cls, norm, eps, alpha):
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10)
        )
        .cuda()
        .eval()
    )
    images = torch.rand(32, 3, 16, 16, device="cuda")
    labels = torch.randint(0, 10, (32,), device="cuda")
    ours = cls(model, eps=eps, alpha=alpha, steps=10, random_start=False, backend=backend)(images, labels)
    theirs = baselines.torchattacks_pgd(model, images, labels, eps=eps, alpha=alpha, steps=10, norm=norm)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_cuda_graph_attack_equals_eager(norm, decay):
    """The CUDA-graph attack replays exactly the eager steps (same images, same step count)."""
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 10),
        )
        .cuda()
        .eval()
    )
    images = torch.rand(32, 3, 16, 16, device="cuda")
    labels = torch.randint(0, 10, (32,), device="cuda")
    kw = dict(
        eps=8 / 255 if norm == "linf" else 0.5,
        alpha=2 / 255 if norm == "linf" else 0.1,
        steps=7,
        random_start=False,
        norm=norm,
        decay=decay,
    )
    eager = PGD(model, **kw)(images, labels)
    graphed = PGD(model, cuda_graph=True, **kw)(images, labels)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-6)


def test_fast_mode_robust_accuracy_close_to_fp32():
    torch.manual_seed(0)
    from pyadvk import models

    model = models.resnet18().cuda().eval()
    images = torch.rand(512, 3, 32, 32, device="cuda")
    with torch.no_grad():
        labels = model(images).argmax(1)
    exact = PGD(model, steps=10, random_start=False)(images, labels)
    fast_model = models.resnet18().cuda().eval()
    fast_model.load_state_dict(model.state_dict())
    fast_model = fast_model.to(memory_format=torch.channels_last)
    fast = PGD(fast_model, steps=10, random_start=False, channels_last=True, autocast=torch.bfloat16, cuda_graph=True)(
        images, labels
    )
    with torch.no_grad():
        acc_exact = (model(exact).argmax(1) == labels).float().mean().item()
        acc_fast = (model(fast).argmax(1) == labels).float().mean().item()
    assert abs(acc_exact - acc_fast) <= 0.005  # issue 6: within 0.5 points of the fp32 result
