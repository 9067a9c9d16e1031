"""The launch path of the Triton bodies of pgd_step, random_init, apgd_step and the half-Huber
ops, run on CPU tensors through Triton's interpreter: launches happen inside the tensors' device
context (Triton launches on the current CUDA device, not the tensors'), never with an empty grid,
and the autotuned kernels give the reference's result on the first call of a size class (issue 14,
section 2)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from pyadvk.ops import apgd_step, apgd_step_, pgd_step, pgd_step_, random_init
from pyadvk.ops import half_huber as hh
from pyadvk.ops import pgd as pgd_ops
from tests.conftest import available
from tests.utils import assert_matches_reference

TRITON = pytest.mark.skipif(
    "triton" not in available(pgd_ops.STEP, "cpu"), reason="Triton's interpreter is not available"
)


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x_orig = torch.rand(shape, generator=gen)
    x_adv = (x_orig + 0.1 * (2 * torch.rand(shape, generator=gen) - 1)).clamp(0, 1)
    return [t.to(dtype) for t in (x_adv, x_orig, torch.randn(shape, generator=gen))]


@TRITON
def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launch of the pgd, apgd
    and half-Huber Triton bodies must happen inside ``on_device_of(tensor)`` (a spy here, on CPU
    tensors under the interpreter), with a grid of at least one program; an empty batch launches
    nothing."""
    from triton.runtime import interpreter

    from pyadvk.kernels import apgd as apgd_kernels
    from pyadvk.kernels import half_huber as hh_kernels
    from pyadvk.kernels import pgd as pgd_kernels

    contexts: list[torch.device] = []
    launches: list[tuple] = []
    depth = [0]

    @contextlib.contextmanager
    def spy(t):
        contexts.append(t.device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_call = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        grid = self.grid
        if callable(grid):
            grid = grid({**dict(zip(self.arg_names, args)), **kwargs})
        assert depth[0] > 0, f"{self.fn.__name__} launched outside its tensors' device context"
        assert math.prod(grid) > 0, f"{self.fn.__name__} launched with an empty grid {grid}"
        launches.append(grid)
        return real_call(self, *args, **kwargs)

    for module in (pgd_kernels, apgd_kernels, hh_kernels):
        monkeypatch.setattr(module, "on_device_of", spy)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)

    x_adv, x_orig, grad = _inputs((2, 3, 5), torch.float32, 4)
    for norm in pgd_ops.NORMS:
        pgd_step(x_adv, x_orig, grad, eps=0.1, alpha=0.05, norm=norm, backend="triton")
        pgd_step_(x_adv.clone(), x_orig, grad, eps=0.1, alpha=0.05, norm=norm, backend="triton")
        random_init(x_orig, eps=0.1, norm=norm, backend="triton")
        apgd_step(x_adv, x_orig, x_orig, grad, eta=0.05, eps=0.1, norm=norm, backend="triton")
        apgd_step_(x_adv, x_orig.clone(), x_orig, grad, eta=0.05, eps=0.1, norm=norm, backend="triton")
    hh.half_huber_relu(grad.requires_grad_(), 0.5, backend="triton").sum().backward()
    assert launches and len(contexts) >= 11
    assert all(device == x_adv.device for device in contexts)

    launches.clear()
    empty = torch.empty(0, 3, 5)
    torch.ops.pyadvk.pgd_step_linf_triton(empty, empty, empty, 0.1, 0.05, None, None, 0.0, 1.0)
    torch.ops.pyadvk.pgd_step_l2_triton_(empty, empty, empty, 0.1, 0.05, None, None, 0.0, 1.0)
    torch.ops.pyadvk.apgd_step_linf_triton_(empty, empty, empty, empty, 0.1, None, 0.1, None, 0.75, 0.0, 1.0)
    torch.ops.pyadvk.apgd_step_l2_triton(empty, empty, empty, empty, 0.1, None, 0.1, None, 0.75, 0.0, 1.0)
    torch.ops.pyadvk.random_init_linf_triton(empty, empty, 0.1, None, 0.0, 1.0)
    torch.ops.pyadvk.half_huber_relu_triton(empty, 0.5)
    assert not launches, f"launched {launches} for an empty batch"


@TRITON
def test_triton_autotuned_in_place_step_is_applied_once():
    """The linf kernels are autotuned (several configurations timed on the first call of a size
    class): the in-place step restores its output between timed runs, so it is applied once, on
    the first call of a new size class as on later ones."""
    from pyadvk.kernels import pgd as pgd_kernels

    pgd_kernels._linf_step_kernel.cache.clear()  # forget the configurations chosen so far
    x_adv, x_orig, grad = _inputs((3, 2, 111), torch.float32, 9)
    ref = pgd_step(x_adv, x_orig, grad, eps=0.5, alpha=0.01, backend="torch")
    for _ in range(2):
        inplace = x_adv.clone()
        pgd_step_(inplace, x_orig, grad, eps=0.5, alpha=0.01, backend="triton")
        assert_matches_reference(inplace, ref, what="triton pgd_step_ (autotuned)")


@TRITON
def test_unfused_launch_option_only_for_real_tensors():
    """Launches on real tensors ask Triton for separately rounded multiplies and adds (as the torch
    body); fake tensors (opcheck, export), whose launches are analysed rather than run, get no
    option that is not a kernel argument."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyadvk.kernels._common import unfused

    assert unfused(torch.zeros(2)) == {"enable_fp_fusion": False}
    with FakeTensorMode():
        fake = torch.zeros(2)
    assert unfused(fake) == {}
