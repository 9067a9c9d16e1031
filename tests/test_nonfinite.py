"""Extreme values never become a confident wrong answer (issue 13, items 4 and 7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyadvk.lipschitz import conv_norm_bound, conv_operator_norm, lipschitz_bound, spectral_norms
from pyadvk.lipschitz.conv import gram_bound


def _model(bad: float | None, where: str = "conv") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    if bad is not None:
        with torch.no_grad():
            (model[0] if where == "conv" else model[3]).weight.view(-1)[1] = bad
    return model


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["conv", "linear"])
@pytest.mark.parametrize("method", ["gram", "power", "reshaped"])
def test_non_finite_weights_give_no_bound(bad, where, method):
    model = _model(bad, where)
    with pytest.raises(ValueError, match="non-finite value"):
        lipschitz_bound(model, (2, 5, 5), method=method)
    with pytest.raises(ValueError, match="non-finite value"):
        spectral_norms(model, (2, 5, 5), method=method)


def test_finite_weights_still_bound():
    bound = lipschitz_bound(_model(None), (2, 5, 5), method="gram")
    assert torch.isfinite(bound) and bound > 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_conv_norms_refuse_non_finite_kernels(bad):
    conv = _model(bad)[0]
    with pytest.raises(ValueError, match="conv.weight has 1 non-finite value"):
        conv_operator_norm(conv, (2, 5, 5))
    with pytest.raises(ValueError, match="conv.weight has 1 non-finite value"):
        conv_norm_bound(conv, (2, 5, 5))


def test_gram_bound_is_never_a_finite_number_for_non_finite_matrices():
    mats = torch.randn(4, 3, 5)
    mats[1, 0, 0] = math.nan
    mats[2, 2, 4] = math.inf
    mats[3].zero_()
    out = gram_bound(mats, 6)
    assert math.isnan(out[1]) and out[2] == math.inf and out[3] == 0
    exact = torch.linalg.matrix_norm(mats[0].double(), ord=2)
    assert exact <= out[0] <= exact * (1 + 1e-3)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_in_place_step_refuses_partly_overlapping_arguments(backend):
    from pyadvk.ops import pgd_step, pgd_step_

    buf = torch.rand(5, 3, 4, 4)
    g = torch.randn(4, 3, 4, 4)
    before = buf.clone()
    with pytest.raises(ValueError, match="x_orig partly overlaps x_adv in memory"):
        pgd_step_(buf[1:], buf[:-1], g, eps=0.1, alpha=0.05, backend=backend)
    with pytest.raises(ValueError, match="grad partly overlaps x_adv in memory"):
        pgd_step_(buf[1:], buf[1:].clone(), buf[:-1], eps=0.1, alpha=0.05, norm="l2", backend=backend)
    assert torch.equal(buf, before), "a refused step wrote"
    # the same tensor is fine (as for torch's own in-place ops), and equals the out-of-place step
    x = torch.rand(4, 3, 4, 4)
    expected = pgd_step(x, x, g, eps=0.1, alpha=0.05, backend=backend)
    torch.testing.assert_close(pgd_step_(x, x, g, eps=0.1, alpha=0.05, backend=backend), expected, rtol=0, atol=0)
    # disjoint views of one buffer are fine too
    y = torch.rand(8, 3, 4, 4)
    pgd_step_(y[:4], y[4:], g, eps=0.1, alpha=0.05, backend=backend)
