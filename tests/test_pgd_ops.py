"""Every body of the fused PGD ops against the torch reference, on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.ops import pgd as pgd_ops
from pyadvk.ops import pgd_step, pgd_step_, random_init
from tests.conftest import available
from tests.utils import (
    ISA_ORDER,
    PGD_DTYPES,
    PGD_SHAPES,
    assert_matches_reference,
    per_sample,
    pgd_inputs,
    pgd_step_args,
    pgd_step_cases,
    run_on_cpu_isa,
)

CPU_BACKENDS = [b for b in available(pgd_ops.STEP, "cpu") if b != "torch"]
# The step's random inputs live in tests/utils.py, shared with tests/test_pgd_gpu.py.
DTYPES, SHAPES, make_inputs, step_cases, _step_args = PGD_DTYPES, PGD_SHAPES, pgd_inputs, pgd_step_cases, pgd_step_args


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(**step_cases)
def test_step_matches_reference(backend, **case):
    (x_adv, x_orig, grad), kw = _step_args(**case)
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    out = pgd_step(x_adv, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(out, ref, what=f"{backend} pgd_step")
    inplace = x_adv.clone()
    returned = pgd_step_(inplace, x_orig, grad, backend=backend, **kw)
    assert returned is inplace
    assert_matches_reference(inplace, ref, what=f"{backend} pgd_step_")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float16 cannot hold these scales
@pytest.mark.parametrize("scale", [2.0**-100, 2.0**-66, 2.0**66, 2.0**100])
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (2, 16385)])
def test_l2_gradient_scale(backend, dtype, scale, shape):
    """The l2 step depends on the gradient's direction only, for gradients from ~1e-30 to ~1e30
    (whose float32 squares underflow or overflow: the norms are taken in float64), and the result
    lies in the ball. Powers of two scale a gradient exactly, in every dtype."""
    x_adv, x_orig, grad = make_inputs(shape, dtype, 5)
    x_adv = (x_orig.float() + 0.9 * (2 * torch.rand(shape) - 1)).clamp(0, 1).to(dtype)  # outside the ball
    kw = dict(eps=0.5, alpha=0.1, norm="l2")
    unit = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    scaled = (grad.float() * scale).to(dtype)
    assert torch.isfinite(scaled).all() and (scaled != 0).sum() == (grad != 0).sum()
    out = pgd_step(x_adv, x_orig, scaled, backend=backend, **kw)
    assert_matches_reference(out, unit, what=f"{backend} l2 step, grad * {scale}")
    if dtype == torch.float32:  # (a bfloat16 result is rounded after the projection)
        dist = (out.double() - x_orig.double()).reshape(shape[0], -1).norm(dim=1)
        assert (dist <= 0.5 * (1 + 1e-5)).all(), dist


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_l2_schedules(two_threads, dtype):
    """The cpp l2 step runs sample at a time when a sample fits its cache budget (2 MiB of inputs)
    and there are at least as many samples as threads, and in two phases over tiles otherwise.
    Both give the same bits (same summation order) and both match the reference."""
    (x_adv, x_orig, grad), kw = _step_args(
        (4, 3, 40, 40), dtype, "l2", 0.5, 0.3, True, False, (0.0, 1.0), True, False, seed=11
    )
    batched = pgd_step(x_adv, x_orig, grad, backend="cpp", **kw)  # 4 samples, 2 threads: per sample
    for b in range(4):  # a batch of 1 on 2 threads: two phases
        one = pgd_step(
            x_adv[b : b + 1], x_orig[b : b + 1], grad[b : b + 1], backend="cpp", **{**kw, "eps": kw["eps"][b : b + 1]}
        )
        assert torch.equal(one, batched[b : b + 1])
    # Samples over the budget in float32 (2.2 MB), under it in 16 bits (1.1 MB).
    (x_adv, x_orig, grad), kw = _step_args(
        (3, 183000), dtype, "l2", 2.0, 0.5, False, True, (0.0, 1.0), False, True, seed=12
    )
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(pgd_step(x_adv, x_orig, grad, backend="cpp", **kw), ref, what="cpp l2")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided"])
def test_layouts(backend, layout):
    x_adv, x_orig, grad = make_inputs((3, 4, 5, 6), torch.float32, 0)
    kw = dict(eps=0.05, alpha=0.02, norm="l2")
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    if layout == "channels_last":
        x_adv, x_orig, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, x_orig, grad))
    elif layout == "mixed":
        x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    else:  # x_adv is a non-dense view into a larger buffer: the in-place op must write through
        buffer = torch.zeros(3, 4, 5, 12)
        buffer[..., ::2] = x_adv
        x_adv = buffer[..., ::2]
    out = pgd_step(x_adv, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(out.contiguous(), ref, what=layout)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    pgd_step_(x_adv, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(x_adv.contiguous(), ref, what=f"{layout} in place")
    if layout == "strided":
        assert torch.equal(buffer[..., 1::2], torch.zeros(3, 4, 5, 6)), "wrote outside the view"


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_nan_and_zero_gradient_make_no_step(backend, norm):
    x_adv, x_orig, _ = make_inputs((2, 50), torch.float32, 3)
    grad = torch.full_like(x_adv, math.nan)
    out = pgd_step(x_adv, x_orig, grad, eps=1.0, alpha=0.1, norm=norm, backend=backend)
    torch.testing.assert_close(out, x_adv, rtol=0, atol=1e-7)
    out = pgd_step(x_adv, x_orig, torch.zeros_like(x_adv), eps=1.0, alpha=0.1, norm=norm, backend=backend)
    torch.testing.assert_close(out, x_adv, rtol=0, atol=1e-7)
    # Where only some entries are NaN, those entries do not move under linf.
    grad = torch.randn_like(x_adv)
    grad[:, :10] = math.nan
    out = pgd_step(x_adv, x_orig, grad, eps=1.0, alpha=0.1, norm=norm, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out[:, :10], x_adv[:, :10], rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_step_semantics(backend):
    """The formulas, checked on values worked out by hand."""
    x_orig = torch.tensor([[0.5, 0.5, 0.98, 0.02]])
    x_adv = torch.tensor([[0.5, 0.53, 0.98, 0.02]])
    grad = torch.tensor([[1.0, 1.0, 2.0, -3.0]])
    out = pgd_step(x_adv, x_orig, grad, eps=0.04, alpha=0.02, backend=backend)
    # 0.5 + 0.02; 0.53 + 0.02 projected to 0.5 + 0.04; 1.0 clipped to 1; 0.0 clipped to 0.
    torch.testing.assert_close(out, torch.tensor([[0.52, 0.54, 1.0, 0.0]]), rtol=0, atol=1e-7)
    # l2: a step of 5 along (3, 4)/5 from the origin, projected onto the ball of radius 2.5.
    x0 = torch.zeros(1, 2)
    out = pgd_step(
        x0, x0, torch.tensor([[3.0, 4.0]]), eps=2.5, alpha=5.0, norm="l2", lower=-10, upper=10, backend=backend
    )
    torch.testing.assert_close(out, torch.tensor([[1.5, 2.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_empty_batch(backend, norm):
    x = torch.empty(0, 3, 4, 4)
    out = pgd_step(x, x, x, eps=0.1, alpha=0.1, norm=norm, backend=backend)
    assert out.shape == x.shape
    assert pgd_step_(x, x, x, eps=0.1, alpha=0.1, norm=norm, backend=backend) is x
    assert random_init(x, eps=0.1, norm=norm, backend=backend).shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    shape=SHAPES,
    dtype=st.sampled_from(DTYPES),
    norm=st.sampled_from(pgd_ops.NORMS),
    eps=st.sampled_from([0.0, 0.03, 1.0]),
    per_sample_eps=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_init_matches_reference(backend, shape, dtype, norm, eps, per_sample_eps, seed):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if per_sample_eps:
        eps = per_sample(eps, shape[0], seed)
    ref = random_init(x, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed), backend="torch")
    out = random_init(x, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed), backend=backend)
    assert_matches_reference(out, ref, what=f"{backend} random_init {norm}")


@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_random_init_is_uniform_in_the_ball(norm):
    """linf: every value within eps, marginals uniform; l2: radius r with P(r <= t) = (t/eps)^D."""
    eps, n, dim = 0.5, 4000, 3
    x = torch.zeros(n, dim)
    gen = torch.Generator().manual_seed(0)
    d = random_init(x, eps=eps, norm=norm, lower=-1, upper=1, generator=gen)
    if norm == "linf":
        assert d.abs().max() <= eps
        # Kolmogorov-Smirnov distance of the pooled values to U(-eps, eps).
        v = d.flatten().sort().values
        cdf = (v + eps) / (2 * eps)
        emp = torch.arange(1, v.numel() + 1) / v.numel()
        assert (cdf - emp).abs().max() < 0.02
    else:
        r = d.norm(dim=1)
        assert r.max() <= eps * (1 + 1e-6)
        v = r.sort().values
        emp = torch.arange(1, n + 1) / n
        assert ((v / eps) ** dim - emp).abs().max() < 0.03
        direction = d / r[:, None]
        assert direction.mean(0).abs().max() < 0.05  # no preferred direction


def test_random_init_generator_reproducible():
    x = torch.rand(2, 3, 8, 8)
    a = random_init(x, eps=0.1, generator=torch.Generator().manual_seed(5))
    b = random_init(x, eps=0.1, generator=torch.Generator().manual_seed(5))
    c = random_init(x, eps=0.1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck_compiled_cpu_ops(norm, inplace):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("the C++ extension is not built")
    x_adv, x_orig, grad = make_inputs((3, 2, 5, 5), torch.float32, 11)
    op = getattr(torch.ops.pyadvk, f"pgd_step_{norm}{'_' if inplace else ''}").default
    torch.library.opcheck(op, (x_adv, x_orig, grad, 0.05, 0.01, None, None, 0.0, 1.0))
    torch.library.opcheck(op, (x_adv, x_orig, grad, 0.0, 0.0, torch.rand(3), torch.rand(3) + 0.1, 0.0, 1.0))


def test_opcheck_random_init_cpu_op():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("the C++ extension is not built")
    x = torch.rand(2, 3, 4, 4)
    torch.library.opcheck(torch.ops.pyadvk.random_init_linf.default, (x, torch.rand_like(x), 0.1, None, 0.0, 1.0))


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in CPU_BACKENDS + ["torch"]])
def test_torch_compile_fullgraph(backend):
    x_adv, x_orig, grad = make_inputs((4, 3, 8, 8), torch.float32, 2)

    def attack_step(x_adv, x_orig, grad):
        pgd_step_(x_adv, x_orig, grad, eps=0.03, alpha=0.01, backend=backend)
        return pgd_step(x_adv, x_orig, grad * 2, eps=0.03, alpha=0.01, norm="l2", backend=backend)

    expected_adv = x_adv.clone()
    expected = attack_step(expected_adv, x_orig, grad)
    compiled = torch.compile(attack_step, fullgraph=True, backend="aot_eager")
    got_adv = x_adv.clone()
    got = compiled(got_adv, x_orig, grad)
    torch.testing.assert_close(got_adv, expected_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.slow  # a subprocess per instruction set running the op tests: 9-30 s each
@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_cpu_instruction_set(isa):
    """The reference tests on each copy of the cpp loops this CPU supports."""
    run_on_cpu_isa(
        isa,
        __file__,
        "cpp and (matches_reference or layouts or nan_and_zero or semantics or schedules or gradient_scale)",
    )
