"""Every body of the pgd / apgd / half-Huber ops that runs on CPU (cpp, Triton under the
interpreter) against the torch body, on tiny tensors whose values hypothesis draws from finite and
non-finite ones: NaN, +-inf, huge (1e30), tiny (1e-30), negative zero, ordinary values (issue 13,
item 6). The torch body defines what a non-finite input gives (the ops' module docstrings say it);
every other body must give the same, NaN where it gives NaN.

Per-sample eps/alpha/eta tensors and scalars are drawn from what the public functions accept
(finite, within float32's range: the functions refuse the rest); the box may be unbounded."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyadvk.ops import apgd as apgd_ops
from pyadvk.ops import apgd_step, apgd_step_, pgd_step, pgd_step_, random_init
from pyadvk.ops import half_huber as hh
from pyadvk.ops import pgd as pgd_ops
from tests.conftest import available
from tests.utils import assert_matches_reference

SPECIAL = [math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30, -1e-30, -0.0, 0.0, 1.0]
# Mostly ordinary values, so that the extreme ones meet ordinary neighbours in one sample.
VALUES = st.one_of(st.floats(-0.5, 1.5, width=32), st.sampled_from(SPECIAL))
SHAPES = st.sampled_from([(1, 1), (2, 3), (3, 1, 2), (1, 5), (2, 2, 2)])
DTYPES = st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])
# Scalar parameters the public functions accept: finite, >= 0, float32-representable.
STEP_SIZES = st.sampled_from([1e-30, 1e-3, 0.1, 2.0, 1e30])
RADII = st.sampled_from([0.0, 1e-30, 0.05, 0.5, 1e30])
BOXES = st.sampled_from([(0.0, 1.0), (-1.0, 2.0), (-math.inf, math.inf), (-1e30, 1e-30)])
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tensor(draw, shape, dtype) -> torch.Tensor:
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape).to(dtype)


def _per_sample_or_scalar(draw, values, batch):
    if draw(st.booleans()):
        return draw(values)
    return torch.tensor(draw(st.lists(values, min_size=batch, max_size=batch)), dtype=torch.float32)


# Triton's interpreter (the Triton body on CPU) converts float32 subnormals to bfloat16 wrongly: it
# stores -1.8e-42 as -2.9e-39 where a real conversion (torch's, and a GPU's) rounds to -0.0. Values
# below bfloat16's smallest normal in both the output and the reference are taken as equal there,
# and only there.
INTERPRETED_TRITON = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def assert_same(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """``out`` equals ``ref`` where ``ref`` is NaN, infinite or equal (negative zero equals zero),
    and is within the project's tolerance elsewhere (float32: 1e-6 absolute, and 1e-6 relative
    for values above 1 (the unbounded box); 16-bit: one unit in the last place)."""
    o, r = out.float(), ref.float()
    same = (o == r) | (o.isnan() & r.isnan())
    if INTERPRETED_TRITON and what.startswith("triton") and ref.dtype == torch.bfloat16:
        tiny = torch.finfo(torch.bfloat16).tiny  # the interpreter's subnormal conversion
        same |= (r.abs() < tiny) & (o.abs() < tiny)
    o_rest, r_rest = torch.where(same, 0.0, o), torch.where(same, 0.0, r)
    if ref.dtype == torch.float32:  # values above 1 (the unbounded box) compare relatively
        scale = torch.maximum(o_rest.abs(), r_rest.abs()).clamp_min(1.0)
        o_rest, r_rest = o_rest / scale, r_rest / scale
    assert_matches_reference(o_rest.to(ref.dtype), r_rest.to(ref.dtype), what=what)


STEP_BACKENDS = [b for b in available(pgd_ops.STEP, "cpu") if b != "torch"]
APGD_BACKENDS = [b for b in available(apgd_ops.APGD_STEP, "cpu") if b != "torch"]
HH_BACKENDS = [b for b in available(hh.HALF_HUBER, "cpu") if b != "torch"]


@st.composite
def step_inputs(draw):
    shape, dtype = draw(SHAPES), draw(DTYPES)
    tensors = [_tensor(draw, shape, dtype) for _ in range(3)]
    lower, upper = draw(BOXES)
    kw = dict(
        eps=_per_sample_or_scalar(draw, RADII, shape[0]),
        alpha=_per_sample_or_scalar(draw, STEP_SIZES, shape[0]),
        norm=draw(st.sampled_from(pgd_ops.NORMS)),
        lower=lower,
        upper=upper,
    )
    return tensors, kw


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@FUZZ
@given(case=step_inputs())
def test_pgd_step_bodies_agree(backend, case):
    (x_adv, x_orig, grad), kw = case
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    assert_same(pgd_step(x_adv, x_orig, grad, backend=backend, **kw), ref, f"{backend} pgd_step {kw}")
    inplace = x_adv.clone()
    pgd_step_(inplace, x_orig, grad, backend=backend, **kw)
    assert_same(inplace, ref, f"{backend} pgd_step_ {kw}")


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@FUZZ
@given(
    shape=SHAPES,
    dtype=DTYPES,
    norm=st.sampled_from(pgd_ops.NORMS),
    box=BOXES,
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_init_bodies_agree(backend, shape, dtype, norm, box, seed, data):
    x = _tensor(data.draw, shape, dtype)
    eps = _per_sample_or_scalar(data.draw, RADII, shape[0])
    kw = dict(eps=eps, norm=norm, lower=box[0], upper=box[1])
    ref = random_init(x, generator=torch.Generator().manual_seed(seed), backend="torch", **kw)
    out = random_init(x, generator=torch.Generator().manual_seed(seed), backend=backend, **kw)
    assert_same(out, ref, f"{backend} random_init {kw}")


@st.composite
def apgd_inputs(draw):
    shape, dtype = draw(SHAPES), draw(DTYPES)
    tensors = [_tensor(draw, shape, dtype) for _ in range(4)]
    lower, upper = draw(BOXES)
    kw = dict(
        eta=_per_sample_or_scalar(draw, st.sampled_from([0.0, 1e-30, 0.03, 1.0, 1e30]), shape[0]),
        eps=_per_sample_or_scalar(draw, RADII, shape[0]),
        momentum=draw(st.sampled_from([0.0, 0.75, 1.0])),
        norm=draw(st.sampled_from(pgd_ops.NORMS)),
        lower=lower,
        upper=upper,
    )
    return tensors, kw


@pytest.mark.parametrize("backend", APGD_BACKENDS)
@FUZZ
@given(case=apgd_inputs())
def test_apgd_step_bodies_agree(backend, case):
    (x, x_prev, x_orig, grad), kw = case
    ref = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    assert_same(apgd_step(x, x_prev, x_orig, grad, backend=backend, **kw), ref, f"{backend} apgd_step {kw}")
    inplace = x_prev.clone()
    apgd_step_(x, inplace, x_orig, grad, backend=backend, **kw)
    assert_same(inplace, ref, f"{backend} apgd_step_ {kw}")


@pytest.mark.parametrize("backend", HH_BACKENDS)
@FUZZ
@given(
    shape=SHAPES,
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    delta=st.sampled_from([1e-30, 0.5, 1.0, 1e30]),
    data=st.data(),
)
def test_half_huber_bodies_agree(backend, shape, dtype, delta, data):
    x, grad, gg = (_tensor(data.draw, shape, dtype) for _ in range(3))
    fwd = hh.half_huber_relu_reference(x, delta)
    bwd = hh.half_huber_relu_backward_reference(grad, x, delta)
    dbl = hh.half_huber_relu_double_backward_reference(gg, grad, x, delta)
    ops = torch.ops.pyadvk
    if backend == "triton":
        body = (
            ops.half_huber_relu_triton,
            ops.half_huber_relu_backward_triton,
            ops.half_huber_relu_double_backward_triton,
        )
    else:
        body = (ops.half_huber_relu, ops.half_huber_relu_backward, ops.half_huber_relu_double_backward)
    what = f"{backend} half_huber delta={delta}"
    assert_same(body[0](x, delta), fwd, what + " forward")
    assert_same(body[1](grad, x, delta), bwd, what + " backward")
    d_grad, d_x = body[2](gg, grad, x, delta)
    assert_same(d_grad, dbl[0], what + " double backward (grad)")
    assert_same(d_x, dbl[1], what + " double backward (x)")
