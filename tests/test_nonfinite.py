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


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_in_place_apgd_step_refuses_partly_overlapping_arguments(backend):
    from pyadvk.ops import apgd_step, apgd_step_
    from pyadvk.ops.apgd import APGD_STEP
    from tests.conftest import available

    if backend not in available(APGD_STEP, "cpu"):
        pytest.skip(f"{backend} is not available here")
    buf = torch.rand(5, 3, 4, 4)
    x, g = torch.rand(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    before = buf.clone()
    kw = dict(eta=0.05, eps=0.1, backend=backend)
    with pytest.raises(ValueError, match="x partly overlaps x_prev in memory"):
        apgd_step_(buf[:-1], buf[1:], x, g, **kw)
    with pytest.raises(ValueError, match="x_orig partly overlaps x_prev in memory"):
        apgd_step_(x, buf[1:], buf[:-1], g, norm="l2", **kw)
    with pytest.raises(ValueError, match="grad partly overlaps x_prev in memory"):
        apgd_step_(x, buf[1:], x, buf[:-1], **kw)
    assert torch.equal(buf, before), "a refused step wrote"
    # the same tensor is fine and equals the out-of-place step; disjoint views are fine too
    xp = torch.rand(4, 3, 4, 4)
    expected = apgd_step(xp, xp, x, g, **kw)
    torch.testing.assert_close(apgd_step_(xp, xp, x, g, **kw), expected, rtol=0, atol=0)
    y = torch.rand(8, 3, 4, 4)
    apgd_step_(y[:4], y[4:], x, g, **kw)


BAD_PARAMETERS = [
    (dict(eps=math.inf), "eps must be finite in float32"),
    (dict(eps=1e39), r"eps must be finite in float32 \(at most 3.402823e\+38\), got 1e\+39"),
    (dict(alpha=math.inf), "alpha must be finite in float32"),
    (
        dict(eps=torch.tensor([0.1, math.inf])),
        r"eps must be finite in float32 .* for every sample, got inf for sample 1",
    ),
    (dict(alpha=torch.tensor([1e39, 0.1], dtype=torch.float64)), "alpha must be finite in float32 .* for sample 0"),
]


@pytest.mark.parametrize("change, match", BAD_PARAMETERS)
def test_non_finite_step_parameters_are_refused(change, match):
    """eps and alpha (eta) must be finite in float32, the type every body computes in: inf, and
    1e39 (finite in double, inf in float32), are refused with the argument and the value."""
    from pyadvk.ops import apgd_step, apgd_step_, pgd_step, pgd_step_, random_init

    x = torch.rand(2, 3)
    before = x.clone()
    kw = {"eps": 0.1, "alpha": 0.05, **change}
    for fn in (pgd_step, pgd_step_):
        with pytest.raises(ValueError, match=match):
            fn(x, x.clone(), torch.randn(2, 3), **kw)
    apgd_kw = dict(eta=kw.pop("alpha"), eps=kw.pop("eps"))
    for fn in (apgd_step, apgd_step_):
        with pytest.raises(ValueError, match=match.replace("alpha", "eta")):
            fn(x.clone(), x, x.clone(), torch.randn(2, 3), **apgd_kw)
    if "eps" in change:
        with pytest.raises(ValueError, match=match):
            random_init(x, eps=change["eps"])
    assert torch.equal(x, before)


def test_gpu_bodies_propagate_nan_in_min_max():
    """fminf/fmaxf (CUDA) and tl.minimum/tl.maximum without propagate_nan (Triton) drop a NaN
    operand on a GPU, where torch.minimum/maximum/clamp propagate it; the interpreter's numpy
    would hide the difference, so the GPU sources of these ops must not use them (they use the
    NaN-propagating helpers of csrc/cuda/common.cuh and kernels/_common.py)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    sources = ["csrc/cuda/pgd.cu", "csrc/cuda/apgd.cu", "csrc/cuda/half_huber.cu"]
    sources += ["kernels/pgd.py", "kernels/apgd.py", "kernels/half_huber.py", "kernels/_common.py"]
    pattern = re.compile(r"\bfminf?\(|\bfmaxf?\(|tl\.(minimum|maximum)\((?![^)]*propagate_nan)|tl\.clamp\(")
    found = []
    for name in sources:
        for number, line in enumerate((root / name).read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "NaN-dropping min/max:\n" + "\n".join(found)
