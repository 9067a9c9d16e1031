"""The Half-Huber ReLU ops: every body against the torch reference (forward, backward, double
backward), values at the breakpoints, gradcheck / gradgradcheck, layouts, opcheck, torch.compile,
the module, and every bad-input path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyadvk
from pyadvk.nn import HalfHuberReLU
from pyadvk.nn.functional import half_huber_relu
from pyadvk.ops import half_huber as hh
from tests.conftest import available
from tests.utils import ISA_ORDER, assert_matches_reference, run_on_cpu_isa

BODIES = available(hh.HALF_HUBER, "cpu")  # torch, cpp (when built), triton (interpreted)
FUSED = [b for b in BODIES if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 5, 7), (1, 3, 17, 19), (2, 1025), (3, 2, 3, 4, 5), (40000,)]
TRITON_SHAPES = [s for s in SHAPES if math.prod(s) <= 5000]
DELTAS = [0.5, 1.0, 0.3, 0.7, 1e-3, 7.25]  # fp32(0.3) rounds up, fp32(0.7) down


def op_body(name: str) -> hh._Body:
    if name == "torch":
        return hh._TORCH
    return hh._triton_body() if name == "triton" else hh._native_body()


def make(shape, dtype, seed, delta, n=1):
    """Values spread over both breakpoints: x in about [-2 delta, 3 delta], some exactly 0 and delta."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen) * 5 - 2) * delta
    if x.numel() > 4:
        flat = x.view(-1)
        flat[0], flat[1], flat[2] = 0.0, delta, -0.0
    others = [torch.randn(shape, generator=gen) for _ in range(n)]
    return [t.to(dtype) for t in [x] + others]


# ---------------------------------------------------------------------------------------------
# Each op of each body against the reference.


@pytest.mark.parametrize("body", FUSED)
@given(
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from(DTYPES + [torch.float64]),
    delta=st.sampled_from(DELTAS),
    seed=st.integers(0, 2**31 - 1),
)
def test_ops_match_reference(body, shape, dtype, delta, seed):
    if body == "triton" and shape not in TRITON_SHAPES:
        shape = (3, 5)
    x, grad, gg = make(shape, dtype, seed, delta, n=2)
    ops = op_body(body)
    assert_matches_reference(ops.forward(x, delta), hh.half_huber_relu_reference(x, delta), what=f"{body} forward")
    assert_matches_reference(
        ops.backward(grad, x, delta), hh.half_huber_relu_backward_reference(grad, x, delta), what=f"{body} backward"
    )
    got = ops.double_backward(gg, grad, x, delta)
    want = hh.half_huber_relu_double_backward_reference(gg, grad, x, delta)
    assert_matches_reference(got[0], want[0], what=f"{body} double backward (wrt grad)")
    assert_matches_reference(got[1], want[1], what=f"{body} double backward (wrt x)")


@pytest.mark.parametrize("body", BODIES)
@given(
    shape=st.sampled_from(TRITON_SHAPES),
    dtype=st.sampled_from(DTYPES),
    delta=st.sampled_from(DELTAS),
    seed=st.integers(0, 2**31 - 1),
)
def test_autograd_matches_reference(body, shape, dtype, delta, seed):
    """The public function's first and second derivatives through autograd are the reference
    formulas, on every body."""
    x, grad_out, gg = make(shape, dtype, seed, delta, n=2)
    x.requires_grad_(True)
    grad_out.requires_grad_(True)
    y = half_huber_relu(x, delta, backend=body)
    assert_matches_reference(y.detach(), hh.half_huber_relu_reference(x.detach(), delta), what="forward")
    (gx,) = torch.autograd.grad(y, x, grad_out, create_graph=True)
    assert_matches_reference(
        gx.detach(), hh.half_huber_relu_backward_reference(grad_out.detach(), x.detach(), delta), what="backward"
    )
    d_x, d_grad = torch.autograd.grad(gx, (x, grad_out), gg)
    want_grad, want_x = hh.half_huber_relu_double_backward_reference(gg, grad_out.detach(), x.detach(), delta)
    assert_matches_reference(d_x, want_x, what="double backward wrt x")
    assert_matches_reference(d_grad, want_grad, what="double backward wrt grad")


def test_reference_is_the_formula():
    """The reference against the piecewise definition written out in float64."""
    delta = 0.3
    x = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    f = torch.where(x < 0, 0.0, torch.where(x <= delta, x * x / (2 * delta), x - delta / 2))
    torch.testing.assert_close(hh.half_huber_relu_reference(x, delta), f, rtol=1e-15, atol=1e-15)
    fp = (x / delta).clamp(0, 1)
    torch.testing.assert_close(
        hh.half_huber_relu_backward_reference(torch.ones_like(x), x, delta), fp, rtol=1e-15, atol=1e-15
    )
    fpp = torch.zeros_like(x).masked_fill((x > 0) & (x < delta), 1 / delta)
    _, got = hh.half_huber_relu_double_backward_reference(torch.ones_like(x), torch.ones_like(x), x, delta)
    torch.testing.assert_close(got, fpp, rtol=1e-15, atol=1e-15)
    # f' is the derivative of f and f'' of f' (central differences away from the breakpoints).
    h = 1e-6
    away = ((x - 0).abs() > 1e-3) & ((x - delta).abs() > 1e-3)
    num = (hh.half_huber_relu_reference(x + h, delta) - hh.half_huber_relu_reference(x - h, delta)) / (2 * h)
    torch.testing.assert_close(num[away], fp[away], rtol=0, atol=1e-8)
    ones = torch.ones_like(x)
    num2 = (
        hh.half_huber_relu_backward_reference(ones, x + h, delta)
        - hh.half_huber_relu_backward_reference(ones, x - h, delta)
    ) / (2 * h)
    torch.testing.assert_close(num2[away], fpp[away], rtol=0, atol=1e-6)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("delta", [0.5, 0.3, 0.7, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_breakpoints(body, delta, dtype):
    """f, f' and f'' at and around 0 and delta: f(0) = 0, f(delta) = delta/2, f'(0) = 0,
    f'(delta) = 1, f''(0) = f''(delta) = 0, f'' = 1/delta inside."""
    d = torch.tensor(delta, dtype=dtype).item()  # delta as the compute type sees it
    x = torch.tensor([-1.0, -0.0, 0.0, d / 2, d, 2 * d, 5.0], dtype=dtype, requires_grad=True)
    y = half_huber_relu(x, delta, backend=body)
    want = torch.tensor([0.0, 0.0, 0.0, d / 8, d / 2, 1.5 * d, 5.0 - d / 2], dtype=dtype)
    torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=0)
    assert y[4].item() == torch.tensor(d / 2, dtype=dtype).item()  # exactly delta/2 at delta
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(g.detach(), torch.tensor([0, 0, 0, 0.5, 1, 1, 1], dtype=dtype), rtol=1e-6, atol=0)
    assert g[1].item() == 0 and g[2].item() == 0 and g[4].item() == 1
    (g2,) = torch.autograd.grad(g.sum(), x)
    want2 = torch.tensor([0, 0, 0, 1 / delta, 0, 0, 0], dtype=dtype)
    torch.testing.assert_close(g2, want2, rtol=1e-6, atol=0)
    # Continuity at delta from below.
    below = torch.tensor([d * (1 - 1e-4)], dtype=dtype)
    assert abs(half_huber_relu(below, delta, backend=body).item() - d / 2) < 2e-4 * d


@pytest.mark.parametrize("body", BODIES)
def test_nan_propagates(body):
    x = torch.tensor([math.nan, 0.2, math.inf, -math.inf], requires_grad=True)
    y = half_huber_relu(x, 0.5, backend=body)
    assert math.isnan(y[0].item()) and y[2].item() == math.inf and y[3].item() == 0
    (g,) = torch.autograd.grad(y.sum(), x)
    assert math.isnan(g[0].item()) and g[2].item() == 1 and g[3].item() == 0


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64.


def _away_from_breakpoints(shape, delta, seed):
    """float64 values at least 1e-3 from 0 and from delta, on both sides of each."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 1.5) * delta
    for b in (0.0, delta):
        near = (x - b).abs() < 1e-3
        x = torch.where(near, b + torch.where(x >= b, 2e-3, -2e-3), x)
    return x


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("delta", [0.5, 0.05, 3.0])
def test_gradcheck_and_gradgradcheck(body, delta):
    x = _away_from_breakpoints((3, 4, 5), delta, 0).requires_grad_(True)
    fn = lambda t: half_huber_relu(t, delta, backend=body)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("body", BODIES)
def test_gradcheck_of_the_backward_ops(body):
    """The registered derivatives of the backward and double-backward ops themselves (third order)."""
    delta = 0.7
    ops = op_body(body) if body != "torch" else hh._TORCH_AUTOGRAD
    x = _away_from_breakpoints((2, 9), delta, 1).requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    gg = torch.randn(2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.backward(a, b, delta), (g, x), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.double_backward(a, b, c, delta), (gg, g, x), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: ops.double_backward(a, b, c, delta), (gg, g, x), eps=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------------------------------------
# Layouts, dtypes, shapes.


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_and_strided(body, dtype):
    x, grad = make((2, 5, 6, 7), dtype, 3, 0.5)
    want = hh.half_huber_relu_reference(x, 0.5)
    want_g = hh.half_huber_relu_backward_reference(grad, x, 0.5)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = half_huber_relu(xc, 0.5, backend=body)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(y.detach().contiguous(), want, what="channels_last forward")
    (g,) = torch.autograd.grad(y, xc, grad)  # grad contiguous, x channels_last: mixed layouts
    assert_matches_reference(g.contiguous(), want_g, what="channels_last backward")
    # A non-dense view is computed on a contiguous copy; the result is the same.
    buf = torch.zeros(2, 5, 6, 14, dtype=dtype)
    buf[..., ::2] = x
    view = buf[..., ::2].requires_grad_(False)
    assert_matches_reference(half_huber_relu(view, 0.5, backend=body), want, what="strided")


@pytest.mark.parametrize("body", BODIES)
def test_empty_and_zero_dim(body):
    e = torch.empty(0, 3, requires_grad=True)
    y = half_huber_relu(e, backend=body)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert e.grad.shape == (0, 3)
    s = torch.tensor(0.25, requires_grad=True)
    y = half_huber_relu(s, backend=body)
    assert y.shape == () and y.item() == pytest.approx(0.0625)


def test_auto_backend_prefers_the_compiled_body():
    expected = "cpp" if "cpp" in BODIES else "torch"
    assert pyadvk._backend.resolve(hh.HALF_HUBER, torch.device("cpu")) == expected


# ---------------------------------------------------------------------------------------------
# opcheck of the compiled CPU ops; torch.compile.


@pytest.mark.skipif("cpp" not in BODIES, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_compiled_cpu_ops(dtype, channels_last):
    x, g, gg = make((2, 3, 4, 5), dtype, 4, 0.5, n=2)
    if channels_last:
        x, g, gg = (t.contiguous(memory_format=torch.channels_last) for t in (x, g, gg))
    ops = torch.ops.pyadvk
    for rg in (False, True):
        xr, gr, ggr = (t.clone().requires_grad_(rg) for t in (x, g, gg))
        torch.library.opcheck(ops.half_huber_relu.default, (xr, 0.5))
        torch.library.opcheck(ops.half_huber_relu_backward.default, (gr, xr, 0.5))
        torch.library.opcheck(ops.half_huber_relu_double_backward.default, (ggr, gr, xr, 0.5))


@pytest.mark.parametrize("body", [b for b in ("cpp", "torch") if b in BODIES])
def test_torch_compile_aot_eager(body):
    """Forward and backward under torch.compile (fake kernels, registered autograd). (Double
    backward through a compiled region is refused by AOTAutograd itself, for any op.)"""
    layer = HalfHuberReLU(0.4, backend=body)

    def loss(x, w):
        return (layer(x * w) ** 2).sum()

    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    w = torch.rand(1, 3, 1, 1, requires_grad=True)
    want = loss(x, w)
    want_x, want_w = torch.autograd.grad(want, (x, w))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(x, w)
    got_x, got_w = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif("cpp" not in BODIES, reason="the C++ extension is not built")
def test_torch_compile_inductor_cpp_body():
    """Inductor on CPU around the cpp op: the op stays one extern call, the rest is generated."""
    layer = HalfHuberReLU(0.5, backend="cpp")

    def fn(x):
        return layer(x * 3 - 1).sum(dim=1)

    x = torch.randn(16, 33, requires_grad=True)
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    got = compiled(x)
    want = fn(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The module.


def test_module():
    layer = HalfHuberReLU(0.25)
    assert repr(layer) == "HalfHuberReLU(delta=0.25)"
    assert repr(HalfHuberReLU(backend="torch")) == "HalfHuberReLU(delta=0.5, backend='torch')"
    assert list(layer.state_dict()) == []
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), hh.half_huber_relu_reference(x, 0.25), rtol=0, atol=0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), HalfHuberReLU(), torch.nn.Linear(5, 2))
    net(x).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_models_build_with_half_huber():
    from pyadvk import models

    net = models.build("small_cnn", activation="half_huber")
    assert any(isinstance(m, HalfHuberReLU) for m in net.modules())


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "delta, err, match",
    [
        (0.0, ValueError, r"delta must be > 0.0, got 0.0"),
        (-0.5, ValueError, r"delta must be > 0.0, got -0.5"),
        (math.nan, ValueError, "delta must not be NaN"),
        (math.inf, ValueError, "delta must be finite, got inf"),
        (True, TypeError, "delta must be a real number, got bool"),
        ("0.5", TypeError, "delta must be a real number, got str"),
    ],
)
def test_bad_delta(delta, err, match):
    with pytest.raises(err, match=match):
        half_huber_relu(torch.randn(3), delta)
    with pytest.raises(err, match=match):
        HalfHuberReLU(delta)


def test_bad_x_and_backend():
    with pytest.raises(TypeError, match=r"x must be float32, float16, bfloat16 or float64, got torch.int64"):
        half_huber_relu(torch.arange(3))
    with pytest.raises(TypeError, match=r"x must be .*got torch.bool"):
        half_huber_relu(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        half_huber_relu([1.0, 2.0])
    with pytest.raises(ValueError, match="backend must be one of"):
        half_huber_relu(torch.randn(3), backend="fast")
    with pytest.raises(ValueError, match="backend must be one of .*got 'fast'"):
        HalfHuberReLU(backend="fast")
    with pytest.raises(pyadvk.BackendUnavailableError, match="cannot run half_huber_relu on a cpu tensor"):
        half_huber_relu(torch.randn(3), backend="cuda")


@pytest.mark.skipif("cpp" not in BODIES, reason="the C++ extension is not built")
def test_compiled_op_argument_checks():
    ops = torch.ops.pyadvk
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=r"half_huber_relu: delta must be finite and > 0, got 0"):
        ops.half_huber_relu(x, 0.0)
    with pytest.raises(
        RuntimeError, match=r"half_huber_relu: x must be float32, float16, bfloat16 or float64, got Int"
    ):
        ops.half_huber_relu(torch.ones(3, dtype=torch.int32), 0.5)
    with pytest.raises(RuntimeError, match="x must be non-overlapping and dense"):
        ops.half_huber_relu(x[..., ::2], 0.5)
    with pytest.raises(RuntimeError, match=r"half_huber_relu_backward: grad must have the dtype of x"):
        ops.half_huber_relu_backward(x.double(), x, 0.5)
    with pytest.raises(RuntimeError, match=r"half_huber_relu_backward: grad must have the shape"):
        ops.half_huber_relu_backward(x.contiguous(memory_format=torch.channels_last), x, 0.5)
    with pytest.raises(RuntimeError, match=r"half_huber_relu_double_backward: gg must have the shape"):
        ops.half_huber_relu_double_backward(x[:1], x, x, 0.5)


@pytest.mark.skipif("cpp" not in BODIES, reason="the C++ extension is not built")
@pytest.mark.slow  # a subprocess per instruction set running the op tests: 9-30 s each
@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_cpu_instruction_set(isa):
    """The reference tests on each copy of the cpp loops this CPU supports."""
    run_on_cpu_isa(isa, __file__, "cpp and (ops_match_reference or breakpoints or channels_last)")
