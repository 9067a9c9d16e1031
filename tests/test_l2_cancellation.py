"""The l2 steps where |x + step g/|g| - x_orig| cancels: every body's projection factor follows the
float d that the torch body computes (the bodies once expanded |d|^2 = pp + 2 s pg + s^2 gg from
first-pass sums, which cancels there, and misses d's float rounding). The two small cases are ones
the fuzz test found (tests/test_fuzz_bodies.py); the large ones cancel over many values, in both
cpp schedules (sample at a time, and in phases over tiles) and over several Triton tiles."""

from __future__ import annotations

import pytest
import torch

from pyadvk.ops import apgd as apgd_ops
from pyadvk.ops import apgd_step, apgd_step_, pgd_step, pgd_step_
from pyadvk.ops import pgd as pgd_ops
from tests.conftest import CUDA, available
from tests.utils import assert_matches_reference

DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
PGD_BODIES = [(b, d) for d in DEVICES for b in available(pgd_ops.STEP, d) if b != "torch"]
APGD_BODIES = [(b, d) for d in DEVICES for b in available(apgd_ops.APGD_STEP, d) if b != "torch"]


def _opposed(batch: int, dim: int, far: float, seed: int, device: str):
    """x_orig in [0, 1]; x = x_orig - far u for a random unit direction u per sample; g = 3 u. A
    step of far + 0.1 along g/|g| lands 0.1 from x_orig: the expansion's terms are (far / 0.1)^2
    times |d|^2, and the float rounding of x itself (~far * 6e-8 per value) is most of d."""
    gen = torch.Generator().manual_seed(seed)
    x_orig = torch.rand(batch, dim, generator=gen)
    u = torch.randn(batch, dim, generator=gen)
    u = u / u.norm(dim=1, keepdim=True)
    return (x_orig - far * u).to(device), x_orig.to(device), (3.0 * u).to(device)


@pytest.mark.parametrize("backend,device", PGD_BODIES)
@pytest.mark.parametrize("batch,dim", [(1, 40_000), (4, 300)])
def test_pgd_l2_step_with_cancelling_direction_matches_reference(backend, device, batch, dim):
    x_adv, x_orig, grad = _opposed(batch, dim, 3e4, seed=batch, device=device)
    kw = dict(eps=0.05, alpha=3e4 + 0.1, norm="l2", lower=-1e5, upper=1e5)
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    # the case is the one meant: |d| (float, as the reference) far from what exact math gives
    assert ((ref - x_orig).norm(dim=1) - 0.05).abs().max() < 1e-4  # projected onto the sphere
    assert_matches_reference(pgd_step(x_adv, x_orig, grad, backend=backend, **kw), ref, what=f"{backend} pgd_step")
    inplace = x_adv.clone()
    pgd_step_(inplace, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(inplace, ref, what=f"{backend} pgd_step_")


@pytest.mark.parametrize("backend,device", APGD_BODIES)
@pytest.mark.parametrize("batch,dim", [(1, 40_000), (4, 300)])
def test_apgd_l2_step_with_cancelling_direction_matches_reference(backend, device, batch, dim):
    x, x_orig, grad = _opposed(batch, dim, 3e4, seed=10 + batch, device=device)
    x_prev = x_orig.clone()
    kw = dict(eta=3e4 + 0.1, eps=0.05, momentum=0.75, norm="l2", lower=-1e5, upper=1e5)
    ref = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(
        apgd_step(x, x_prev, x_orig, grad, backend=backend, **kw), ref, what=f"{backend} apgd_step"
    )
    inplace = x_prev.clone()
    apgd_step_(x, inplace, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(inplace, ref, what=f"{backend} apgd_step_")


@pytest.mark.parametrize("backend,device", APGD_BODIES)
def test_apgd_l2_step_huge_opposite_step_found_by_fuzzing(backend, device):
    """x = -1e30 and a step of 1e30 along g/|g| = +1 meet exactly at x_orig's first value (0):
    d1 = (0, -1), projected to eps 0.05 (the cpp body used to keep 1.0, its expansion cancelling)."""
    x = torch.tensor([[-1e30, 0.0]], device=device)
    x_orig = torch.tensor([[0.0, 1.0]], device=device)
    grad = torch.tensor([[0.2461, 0.0]], device=device)
    kw = dict(eta=1e30, eps=0.05, momentum=1.0, norm="l2", lower=0.0, upper=1.0)
    out = apgd_step(x, torch.zeros_like(x), x_orig, grad, backend=backend, **kw)
    assert out.cpu()[0].tolist() == pytest.approx([0.0, 0.95], abs=1e-6)


@pytest.mark.parametrize("backend,device", PGD_BODIES)
def test_pgd_l2_step_tiny_gradient_huge_step_found_by_fuzzing(backend, device):
    """|g| = 1e-30 and alpha = 1e30: alpha/|g| overflows float, alpha * (g/|g|) does not. eps = 0
    projects d = (0, 0, 1e30) back onto x_orig (the cpp body used to write 1.0)."""
    x = torch.zeros(1, 3, device=device)
    grad = torch.tensor([[0.0, 0.0, 1e-30]], device=device)
    out = pgd_step(x, x.clone(), grad, eps=0.0, alpha=1e30, norm="l2", lower=0.0, upper=1.0, backend=backend)
    assert out.cpu().tolist() == [[0.0, 0.0, 0.0]]
