"""Every body of the fused APGD step against the torch reference, on fresh random inputs; properties
of the reference itself; every bad-input path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.ops import apgd_step, apgd_step_, pgd_step
from pyadvk.ops.apgd import APGD_STEP
from pyadvk.ops.pgd import NORMS
from tests.conftest import available
from tests.utils import ISA_ORDER, PGD_DTYPES, PGD_SHAPES, assert_matches_reference, run_on_cpu_isa, ulp

BACKENDS = available(APGD_STEP, "cpu")
BODIES = [b for b in BACKENDS if b != "torch"]  # the bodies tested against the reference
DTYPES = PGD_DTYPES
# The PGD step's shapes (no block size divides them; a sample longer than one cpp tile of 16384).
SHAPES = PGD_SHAPES


def make_inputs(
    shape, dtype, seed, *, nan_grad=False, zero_grad_sample=False, grad_scale=1.0, box=(0.0, 1.0), device="cpu"
):
    """(x, x_prev, x_orig, grad): x_orig in the box, x and x_prev within 0.1 of it (in the box)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (max(box[0], -2.0), min(box[1], 2.0))
    x_orig = lo + (hi - lo) * torch.rand(shape, generator=gen)
    x = (x_orig + 0.1 * (2 * torch.rand(shape, generator=gen) - 1)).clamp(*box)
    x_prev = (x_orig + 0.1 * (2 * torch.rand(shape, generator=gen) - 1)).clamp(*box)
    grad = torch.randn(shape, generator=gen) * grad_scale
    grad[torch.rand(shape, generator=gen) < 0.05] = 0.0
    if nan_grad:
        grad[torch.rand(shape, generator=gen) < 0.1] = math.nan
    if zero_grad_sample:
        grad[0] = 0.0
    return [t.to(dtype=dtype, device=device) for t in (x, x_prev, x_orig, grad)]


def per_sample(value, batch, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed + 1)
    return value * (0.5 + torch.rand(batch, generator=gen)).to(device)


step_cases = dict(
    shape=SHAPES,
    dtype=st.sampled_from(DTYPES),
    norm=st.sampled_from(NORMS),
    eta=st.sampled_from([0.0, 1e-3, 0.02, 0.3]),
    eps=st.sampled_from([0.0, 0.01, 0.05, 0.5, 1e30]),  # 1e30: no projection in effect
    momentum=st.sampled_from([1.0, 0.75, 0.0]),
    per_sample_eta=st.booleans(),
    per_sample_eps=st.booleans(),
    box=st.sampled_from([(0.0, 1.0), (0.2, 0.7), (-math.inf, math.inf)]),
    nan_grad=st.booleans(),
    zero_grad_sample=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def step_args(
    shape,
    dtype,
    norm,
    eta,
    eps,
    momentum,
    per_sample_eta,
    per_sample_eps,
    box,
    nan_grad,
    zero_grad_sample,
    seed,
    device="cpu",
):
    tensors = make_inputs(
        shape, dtype, seed, nan_grad=nan_grad, zero_grad_sample=zero_grad_sample, box=box, device=device
    )
    batch = shape[0]
    if per_sample_eta:
        eta = per_sample(eta, batch, seed, device)
    if per_sample_eps:
        eps = per_sample(eps, batch, seed + 7, device)
    return tensors, dict(eta=eta, eps=eps, momentum=momentum, norm=norm, lower=box[0], upper=box[1])


def check_body(backend, tensors, kw, what=""):
    """The body's out-of-place and in-place results equal the reference; in place writes x_prev
    only (x, x_orig and grad untouched) and returns it."""
    x, x_prev, x_orig, grad = tensors
    ref = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    out = apgd_step(x, x_prev, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(out, ref, what=f"{backend} apgd_step {what}")
    before = [t.clone() for t in (x, x_orig, grad)]
    target = x_prev.clone()
    returned = apgd_step_(x, target, x_orig, grad, backend=backend, **kw)
    assert returned is target
    assert_matches_reference(target, ref, what=f"{backend} apgd_step_ {what}")
    for name, t, b in zip(("x", "x_orig", "grad"), (x, x_orig, grad), before):
        assert torch.equal(t.nan_to_num(), b.nan_to_num()), f"{backend} apgd_step_ wrote into {name}"
    return ref


@pytest.mark.parametrize("backend", BODIES)
@given(**step_cases)
def test_step_matches_reference(backend, **case):
    tensors, kw = step_args(**case)
    check_body(backend, tensors, kw)


@pytest.mark.parametrize("backend", BODIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [2.0**-100, 2.0**-66, 2.0**66, 2.0**100])
def test_gradient_scale(backend, dtype, norm, scale):
    """The step depends on the gradient's direction only, from 1e-30 to 1e30 (the norms are not
    taken in float32, where the squares would underflow or overflow), and the result stays in the
    ball and the box. (Powers of two scale a gradient exactly, in float32 and bfloat16 alike.)"""
    x, x_prev, x_orig, grad = make_inputs((3, 3, 11, 13), dtype, 5)
    kw = dict(eta=0.3, eps=0.5, momentum=0.75, norm=norm)
    unit = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    scaled = (grad.float() * scale).to(dtype)
    ref = check_body(backend, (x, x_prev, x_orig, scaled), kw, what=f"grad * {scale}")
    assert_matches_reference(ref, unit, what=f"reference, grad * {scale} against grad")
    assert_in_ball_and_box(ref, x_orig, 0.5, norm, 0.0, 1.0)


@pytest.mark.parametrize("backend", BODIES)
def test_l2_far_from_the_ball(backend):
    """x far outside the ball and a step that brings it back close to x_orig: the projections
    stay exact (no cancellation in the norms)."""
    x_orig = torch.full((2, 1000), 0.5)
    offset = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    x = x_orig + 3.0 * offset / offset.norm(dim=1, keepdim=True)
    grad = -offset * 1e25
    for eta, eps in ((3.0, 1e-3), (2.999, 1e-3), (3.0, 0.0)):
        kw = dict(eta=eta, eps=eps, momentum=0.75, norm="l2", lower=-10.0, upper=10.0)
        ref = check_body(backend, (x, x, x_orig, grad), kw, what=f"eta {eta} eps {eps}")
        assert_in_ball_and_box(ref, x_orig, eps, "l2", -10.0, 10.0)


# ---------------------------------------------------------------------------------------------
# Layouts, empty batches, NaN, zero gradients.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided"])
@pytest.mark.parametrize("norm", NORMS)
def test_layouts(backend, layout, norm):
    x, x_prev, x_orig, grad = make_inputs((3, 4, 5, 6), torch.float32, 0)
    kw = dict(eta=0.02, eps=0.05 if norm == "linf" else 0.3, momentum=0.75, norm=norm)
    ref = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    if layout == "channels_last":
        x, x_prev, x_orig, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, x_prev, x_orig, grad))
    elif layout == "mixed":
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    else:  # x_prev is a non-dense view into a larger buffer: the in-place op must write through it
        buffer = torch.zeros(3, 4, 5, 12)
        buffer[..., ::2] = x_prev
        x_prev = buffer[..., ::2]
    out = apgd_step(x, x_prev, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(out.contiguous(), ref, what=layout)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    returned = apgd_step_(x, x_prev, x_orig, grad, backend=backend, **kw)
    assert returned is x_prev
    assert_matches_reference(x_prev.contiguous(), ref, what=f"{layout} in place")
    if layout == "strided":
        assert torch.equal(buffer[..., 1::2], torch.zeros(3, 4, 5, 6)), "wrote outside the view"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_empty_batch(backend, norm):
    x = torch.empty(0, 3, 4, 4)
    out = apgd_step(x, x, x, x, eta=0.1, eps=0.1, norm=norm, backend=backend)
    assert out.shape == x.shape
    x_prev = torch.empty(0, 3, 4, 4)
    assert apgd_step_(x, x_prev, x, x, eta=torch.empty(0), eps=0.1, norm=norm, backend=backend) is x_prev


@pytest.mark.parametrize("backend", BODIES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("where", ["x", "x_prev", "x_orig"])
def test_nan_in_points_propagates_like_the_reference(backend, norm, where):
    tensors = make_inputs((3, 50), torch.float32, 4)
    index = ("x", "x_prev", "x_orig").index(where)
    tensors[index][1, 7] = math.nan
    ref = check_body(backend, tensors, dict(eta=0.05, eps=0.1, momentum=0.75, norm=norm), what=f"NaN in {where}")
    assert ref[1, 7].isnan()
    assert not ref[0].isnan().any() and not ref[2].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_nan_and_zero_gradient_make_no_step(backend, norm):
    """With momentum 1, a NaN or zero gradient leaves a point of the ball where it is."""
    x, x_prev, x_orig, _ = make_inputs((2, 50), torch.float32, 3)
    x = (x_orig + 0.01 * (x - x_orig)).clamp(0, 1)  # well inside the ball of radius 0.05 (both norms)
    for grad in (torch.full_like(x, math.nan), torch.zeros_like(x)):
        out = apgd_step(x, x_prev, x_orig, grad, eta=0.1, eps=0.05, momentum=1.0, norm=norm, backend=backend)
        torch.testing.assert_close(out, x, rtol=0, atol=1e-7)
    grad = torch.randn_like(x)
    grad[:, :10] = math.nan
    out = apgd_step(x, x_prev, x_orig, grad, eta=0.01, eps=0.05, momentum=1.0, norm=norm, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out[:, :10], x[:, :10], rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The reference: hand-worked values, the published algorithm, the constraint set.


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_semantics(backend):
    """The formulas on values worked out by hand (eta 0.02, eps 0.03, momentum 0.75)."""
    x_orig = torch.tensor([[0.5, 0.5, 0.5, 0.98]])
    x = torch.tensor([[0.52, 0.5, 0.47, 0.98]])
    x_prev = torch.tensor([[0.5, 0.48, 0.5, 0.96]])
    grad = torch.tensor([[1.0, -1.0, 0.0, 1.0]])
    out = apgd_step(x, x_prev, x_orig, grad, eta=0.02, eps=0.03, backend=backend)
    # z = (0.53 [0.54 projected], 0.48, 0.47, 1.0 [clipped]);
    # w = x + 0.75 (z - x) + 0.25 (x - x_prev) = (0.5325 -> 0.53, 0.49, 0.4625 -> 0.47, 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.53, 0.49, 0.47, 1.0]]), rtol=0, atol=1e-7)
    # l2 from x = (1, 0), x_prev = x_orig = 0, grad along (0, 1), eta 1, eps 1.2:
    # z = 1.2 (1, 1)/sqrt(2); w = (1, 0) + 0.75 (z - (1, 0)) + 0.25 (1, 0); y = 1.2 w/|w|.
    zero = torch.zeros(1, 2)
    out = apgd_step(
        torch.tensor([[1.0, 0.0]]),
        zero,
        zero,
        torch.tensor([[0.0, 2.0]]),
        eta=1.0,
        eps=1.2,
        norm="l2",
        lower=-10,
        upper=10,
        backend=backend,
    )
    z = 1.2 / math.sqrt(2)
    w = (1.0 + 0.75 * (z - 1.0) + 0.25, 0.75 * z)
    r = math.hypot(*w)
    torch.testing.assert_close(out, torch.tensor([[1.2 * w[0] / r, 1.2 * w[1] / r]]), rtol=0, atol=1e-6)


def algorithm_1(norm, x_k, x_km1, x_0, grad, eta, eps, alpha, lower, upper):
    """The update of Croce & Hein 2020, Algorithm 1 (APGD), written out per image in float64:

    z^(k+1) = P_S(x^(k) + eta^(k) * s(grad f(x^(k))))
    x^(k+1) = P_S(x^(k) + alpha * (z^(k+1) - x^(k)) + (1 - alpha) * (x^(k) - x^(k-1)))

    with s = sign for Linf and s(g) = g / ||g||_2 for L2, and P_S the projection onto the eps-ball
    around the clean image x^(0) followed by the clip to the image domain [lower, upper]."""

    def s(g):
        if norm == "linf":
            return torch.sign(g)
        length = torch.linalg.vector_norm(g)
        return g / length if length > 0 else torch.zeros_like(g)

    def P_S(v, x0, radius):
        if norm == "linf":
            v = torch.clamp(v, x0 - radius, x0 + radius)
        else:
            delta = v - x0
            length = torch.linalg.vector_norm(delta)
            if length > radius:
                delta = delta * (radius / length)
            v = x0 + delta
        return torch.clamp(v, lower, upper)

    out = []
    for b in range(x_k.shape[0]):
        xk, xkm1, x0, g = (t[b].double() for t in (x_k, x_km1, x_0, grad))
        e = float(eps[b]) if isinstance(eps, torch.Tensor) else eps
        h = float(eta[b]) if isinstance(eta, torch.Tensor) else eta
        z = P_S(xk + h * s(g), x0, e)
        out.append(P_S(xk + alpha * (z - xk) + (1 - alpha) * (xk - xkm1), x0, e))
    return torch.stack(out)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.3])
@pytest.mark.parametrize("box", [(0.0, 1.0), (0.2, 0.7)])
def test_reference_is_algorithm_1(norm, alpha, box):
    x, x_prev, x_orig, grad = make_inputs((6, 3, 9, 7), torch.float32, 21, box=box)
    eps = per_sample(0.05 if norm == "linf" else 0.4, 6, 1)
    eta = per_sample(0.03 if norm == "linf" else 0.3, 6, 2)
    ref = apgd_step(x, x_prev, x_orig, grad, eta=eta, eps=eps, momentum=alpha, norm=norm, lower=box[0], upper=box[1])
    expected = algorithm_1(norm, x, x_prev, x_orig, grad, eta, eps, alpha, *box)
    assert_matches_reference(ref, expected.float(), what="reference against Algorithm 1")


def assert_in_ball_and_box(y, x_orig, eps, norm, lower, upper):
    """y lies in the box and in the eps-ball around x_orig, up to the rounding of the last float32
    operations and of the cast to y's dtype (half a unit in the last place each)."""
    dtype = y.dtype
    lo = torch.tensor(lower).to(dtype).float()
    hi = torch.tensor(upper).to(dtype).float()
    assert (y.float() >= lo).all() and (y.float() <= hi).all(), "outside the box"
    batch = y.shape[0]
    e = torch.as_tensor(eps, dtype=torch.float64).expand(batch)
    delta = (y.double() - x_orig.double()).reshape(batch, -1)
    rounding = (ulp(y, torch.float32) + ulp(y, dtype)).double().reshape(batch, -1)
    if norm == "linf":
        slack = (ulp(x_orig.abs() + e.float().view((-1,) + (1,) * (y.dim() - 1)), torch.float32)).double()
        excess = delta.abs() - e[:, None] - rounding - slack.reshape(batch, -1)
        assert (excess <= 0).all(), f"outside the linf ball by {excess.max().item():.3g}"
    else:
        excess = delta.norm(dim=1) - e * (1 + 2**-22) - rounding.norm(dim=1)
        assert (excess <= 0).all(), f"outside the l2 ball by {excess.max().item():.3g}"


@given(**step_cases)
def test_reference_stays_in_ball_and_box(**case):
    (x, x_prev, x_orig, grad), kw = step_args(**case)
    y = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    assert_in_ball_and_box(y, x_orig, kw["eps"], kw["norm"], kw["lower"], kw["upper"])


@given(**{k: v for k, v in step_cases.items() if k not in ("momentum", "eta", "per_sample_eta")})
def test_momentum_one_is_the_projected_pgd_step(**case):
    """momentum = 1: y = P(z) = z, the plain projected step pgd_step with alpha = eta (both norms:
    z is pgd_step's l2 step, and P leaves a point of the ball where it is)."""
    (x, x_prev, x_orig, grad), kw = step_args(**case, eta=0.02, momentum=1.0, per_sample_eta=True)
    y = apgd_step(x, x_prev, x_orig, grad, backend="torch", **kw)
    del kw["momentum"]
    z = pgd_step(x, x_orig, grad, alpha=kw.pop("eta"), backend="torch", **kw)
    assert_matches_reference(y, z, what="apgd_step(momentum=1) against pgd_step")


# ---------------------------------------------------------------------------------------------
# Bad input: every path of the public wrappers names the argument, the value and the expectation,
# and changes nothing.


def _good():
    x, x_prev, x_orig, grad = make_inputs((2, 3, 4, 4), torch.float32, 0)
    return dict(x=x, x_prev=x_prev, x_orig=x_orig, grad=grad, eta=0.01, eps=0.03)


BAD_INPUTS = [
    (dict(x=[[0.5]]), TypeError, "x must be a torch.Tensor, got list"),
    (
        dict(grad=torch.zeros(2, 3, 4, 4, dtype=torch.int32)),
        TypeError,
        "grad must be float32, float16 or bfloat16, got torch.int32",
    ),
    (dict(x=torch.tensor(0.5)), ValueError, r"x must have at least 1 dim\(s\), got shape \(\)"),
    (
        dict(x_prev=torch.zeros(2, 3, 4, 5)),
        ValueError,
        r"x_prev must have the shape of x \(2, 3, 4, 4\), got \(2, 3, 4, 5\)",
    ),
    (
        dict(x_orig=torch.zeros(2, 3, 4, 4, dtype=torch.float16)),
        TypeError,
        r"x_orig must have the dtype of x \(torch.float32\), got torch.float16",
    ),
    (
        dict(grad=torch.zeros(2, 3, 4, 4, device="meta")),
        ValueError,
        r"grad must be on the device of x \(cpu\), got meta",
    ),
    (dict(norm="l1"), ValueError, "norm must be one of 'linf', 'l2'; got 'l1'"),
    (dict(lower=1.0, upper=0.0), ValueError, "lower must be < upper, got lower=1.0, upper=0.0"),
    (dict(lower=math.nan), ValueError, "lower must not be NaN"),
    (dict(momentum=-0.1), ValueError, "momentum must be >= 0.0, got -0.1"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=math.nan), ValueError, "momentum must not be NaN"),
    (dict(momentum="0.75"), TypeError, "momentum must be a real number, got str '0.75'"),
    (dict(eta=-1.0), ValueError, "eta must be >= 0.0, got -1.0"),
    (dict(eta=None), TypeError, "eta must be a real number, got NoneType None"),
    (dict(eta=torch.ones(3)), ValueError, r"eta must be a float or a floating tensor of shape \(2,\)"),
    (dict(eta=torch.tensor([0.1, -0.1])), ValueError, "eta must be >= 0 for every sample, got -0.1.* for sample 1"),
    (dict(eps=math.nan), ValueError, "eps must not be NaN"),
    (dict(eps=torch.tensor([0.1, math.nan])), ValueError, "eps must be >= 0 for every sample, got nan for sample 1"),
    (
        dict(eps=torch.ones(2, dtype=torch.int64)),
        ValueError,
        r"eps must be a float or a floating tensor of shape \(2,\)",
    ),
    (dict(backend="fortran"), ValueError, "backend must be one of auto, cuda, triton, cpp, torch; got 'fortran'"),
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bad, error, message", BAD_INPUTS)
def test_bad_input(bad, error, message, inplace):
    args = {**_good(), **bad}
    tensors = [args.pop(name) for name in ("x", "x_prev", "x_orig", "grad")]
    before = tensors[1].clone()
    with pytest.raises(error, match=message):
        (apgd_step_ if inplace else apgd_step)(*tensors, **args)
    assert torch.equal(tensors[1], before), "a failed call wrote into x_prev"


def test_forced_backend_that_cannot_run_lists_every_backend():
    good = _good()
    from pyadvk._backend import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot run apgd_step on a cpu tensor"):
        apgd_step(good["x"], good["x_prev"], good["x_orig"], good["grad"], eta=0.1, eps=0.1, backend="cuda")


# ---------------------------------------------------------------------------------------------
# The compiled CPU ops: schema checks (opcheck), their own argument checks, the l2 schedules, every
# instruction set.

NEEDS_CPP = pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")


def _op(norm, inplace, suffix=""):
    return getattr(torch.ops.pyadvk, f"apgd_step_{norm}{suffix}{'_' if inplace else ''}").default


@NEEDS_CPP
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck_compiled_cpu_ops(norm, inplace):
    x, x_prev, x_orig, grad = make_inputs((3, 2, 5, 5), torch.float32, 11)
    op = _op(norm, inplace)
    torch.library.opcheck(op, (x, x_prev, x_orig, grad, 0.05, None, 0.03, None, 0.75, 0.0, 1.0))
    per = torch.rand(3)
    torch.library.opcheck(op, (x, x_prev, x_orig, grad, 0.0, per, 0.0, per + 0.1, 1.0, 0.0, 1.0))


@NEEDS_CPP
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(3, 2, 5, 5, dtype=torch.float64)), "x must be float32, float16 or bfloat16, got Double"),
        (dict(x=torch.tensor(0.5)), "x must have a batch dimension"),
        (dict(x_prev=torch.zeros(3, 2, 5, 4)), r"x_prev must have the shape of x \[3, 2, 5, 5\], got \[3, 2, 5, 4\]"),
        (dict(grad=torch.zeros(3, 2, 5, 5, dtype=torch.float16)), "x_prev, x_orig and grad must have the dtype of x"),
        (dict(x_orig=torch.zeros(3, 2, 5, 10)[..., ::2]), "x_orig must be dense in the memory format of x"),
        (dict(x=torch.zeros(3, 2, 5, 10)[..., ::2]), "x must be contiguous or channels_last"),
        (dict(eta=-0.1), "eta must be >= 0, got -0.1"),
        (dict(eps=math.nan), "eps must be >= 0, got nan"),
        (dict(eta_t=torch.ones(2)), r"eta_per_sample must have shape \(3,\), got \[2\]"),
        (dict(eps_t=torch.ones(3, dtype=torch.float64)), "eps_per_sample must be float32, got Double"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
        (dict(lower=1.0, upper=0.0), "lower must be < upper, got lower=1, upper=0"),
    ],
)
@pytest.mark.parametrize("norm", NORMS)
def test_compiled_op_checks(change, message, norm):
    x, x_prev, x_orig, grad = make_inputs((3, 2, 5, 5), torch.float32, 1)
    args = dict(x=x, x_prev=x_prev, x_orig=x_orig, grad=grad, eta=0.1, eta_t=None, eps=0.1, eps_t=None)
    args.update(momentum=0.75, lower=0.0, upper=1.0)
    args.update(change)
    with pytest.raises(RuntimeError, match=f"apgd_step_{norm}: {message}"):
        _op(norm, False)(*args.values())
    target = args["x_prev"].clone()
    args["x_prev"] = target
    with pytest.raises(RuntimeError, match=f"apgd_step_{norm}_: {message}"):
        _op(norm, True)(*args.values())
    assert torch.equal(target, args["x_prev"])


@NEEDS_CPP
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_l2_schedules(two_threads, dtype):
    """The cpp l2 step runs sample at a time when a sample's four inputs fit its cache budget and
    there are at least as many samples as threads, else in phases over tiles. Both give the same
    bits (same summation order) and both match the reference."""
    (x, x_prev, x_orig, grad), kw = step_args(
        (4, 3, 40, 40), dtype, "l2", 0.3, 0.5, 0.75, False, True, (0.0, 1.0), True, False, seed=11
    )
    batched = apgd_step(x, x_prev, x_orig, grad, backend="cpp", **kw)  # 4 samples, 2 threads: per sample
    for b in range(4):  # a batch of 1 on 2 threads: phases
        one = apgd_step(
            *(t[b : b + 1] for t in (x, x_prev, x_orig, grad)), backend="cpp", **{**kw, "eps": kw["eps"][b : b + 1]}
        )
        assert torch.equal(one, batched[b : b + 1])
    # Samples over the budget in float32 (4 x 4 x 140000 bytes), under it in 16 bits.
    (x, x_prev, x_orig, grad), kw = step_args(
        (3, 140000), dtype, "l2", 0.5, 2.0, 0.75, True, False, (0.0, 1.0), False, True, seed=12
    )
    check_body("cpp", (x, x_prev, x_orig, grad), kw, what="cpp l2 large samples")


@NEEDS_CPP
@pytest.mark.slow  # a subprocess per instruction set running the op tests: 9-30 s each
@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_cpu_instruction_set(isa):
    """The reference tests on each copy of the cpp loops this CPU supports."""
    run_on_cpu_isa(
        isa,
        __file__,
        "cpp and (matches_reference or gradient_scale or far_from or layouts or nan or semantics or schedules)",
    )


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in BACKENDS])
def test_torch_compile_fullgraph(backend):
    x, x_prev, x_orig, grad = make_inputs((4, 3, 8, 8), torch.float32, 2)

    def two_steps(x, x_prev, x_orig, grad):
        apgd_step_(x, x_prev, x_orig, grad, eta=0.01, eps=0.03, backend=backend)
        return apgd_step(x_prev, x, x_orig, grad * 2, eta=0.1, eps=0.5, norm="l2", backend=backend)

    expected_prev = x_prev.clone()
    expected = two_steps(x, expected_prev, x_orig, grad)
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    got_prev = x_prev.clone()
    got = compiled(x, got_prev, x_orig, grad)
    torch.testing.assert_close(got_prev, expected_prev, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
