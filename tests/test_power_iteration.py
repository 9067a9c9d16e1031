"""Every body of the batched power iteration against the torch reference, the spectral norm it
converges to, and every bad-input path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyadvk.ops import power_iteration
from pyadvk.ops.power_iteration import POWER_ITERATION
from tests.conftest import available
from tests.utils import ISA_ORDER, run_on_cpu_isa

CPU_BACKENDS = [b for b in available(POWER_ITERATION, "cpu") if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Shapes no block size divides, rows and columns, a conv kernel (4-D), tall and wide; (1100, 150)
# gets two column tasks on the cpp body in float32 (a task holds at most 512 KiB of W) and one in
# 16 bits.
SHAPES = [
    (1, 7),
    (7, 1),
    (1, 1),
    (3, 5),
    (17, 33),
    (65, 513),
    (10, 64),
    (8, 3, 3, 3),
    (513, 17),
    (6, 2, 5),
    (1100, 150),
]


def make_case(shapes, dtype, seed, zero=()):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    for i in zero:
        ws[i].zero_()
    us = [torch.randn(s[0], generator=gen) for s in shapes]
    return ws, us


def assert_close_sigma(out, ref, what):
    """σ, u and v agree to float32 rounding of the reductions (relative 2e-5 of each value's scale)."""
    s, u, v = out
    rs, ru, rv = ref
    assert s.dtype == torch.float32 and s.shape == rs.shape, (s.shape, rs.shape)
    torch.testing.assert_close(s, rs, rtol=2e-5, atol=1e-6, msg=lambda m: f"{what} sigma: {m}")
    for i, (a, b) in enumerate(zip(u, ru)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, i=i: f"{what} u[{i}]: {m}")
    for i, (a, b) in enumerate(zip(v, rv)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, i=i: f"{what} v[{i}]: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    n_iters=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_matches_reference(backend, shapes, dtype, n_iters, seed, data):
    if backend == "triton":  # the interpreter is slow: fewer, smaller matrices
        shapes = [s for s in shapes if torch.Size(s).numel() < 4000] or [(3, 5)]
    zero = data.draw(st.sets(st.integers(0, len(shapes) - 1), max_size=1))
    ws, us = make_case(shapes, dtype, seed, zero)
    ref = power_iteration(ws, us, n_iters, backend="torch")
    out = power_iteration(ws, us, n_iters, backend=backend)
    assert_close_sigma(out, ref, f"{backend} {dtype} {shapes}")
    for i in zero:
        assert out[0][i] == 0 and torch.equal(out[1][i], us[i]) and not out[2][i].any()


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_warm_start_converges_to_spectral_norm(backend):
    ws, us = make_case([(40, 30), (1, 12), (12, 1), (16, 3, 3, 3)], torch.float32, 0)
    sigmas = None
    for _ in range(60):  # 60 warm-started single steps
        sigmas, us, _ = power_iteration(ws, us, 1, backend=backend)
    exact = torch.stack([torch.linalg.matrix_norm(w.double().reshape(w.shape[0], -1), ord=2) for w in ws])
    torch.testing.assert_close(sigmas.double(), exact, rtol=1e-4, atol=0)
    # one call of n iterations is n warm-started calls of one iteration
    ws2, us2 = make_case([(40, 30), (12, 1)], torch.float32, 1)
    a = power_iteration(ws2, us2, 5, backend=backend)
    b = (None, us2, None)
    for _ in range(5):
        b = power_iteration(ws2, b[1], 1, backend=backend)
    assert_close_sigma(a, b, "n_iters vs warm starts")


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_rank_one_exact_after_one_iteration(backend):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, generator=gen), torch.randn(14, generator=gen)
    w = torch.outer(a, b)
    s, u, v = power_iteration([w], [torch.randn(9, generator=gen)], 1, backend=backend)
    torch.testing.assert_close(s[0], a.norm() * b.norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close((u[0] @ w @ v[0]), s[0], rtol=1e-5, atol=0)  # σ = uᵀWv


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_zero_matrix_and_zero_start(backend):
    ws = [torch.zeros(5, 4), torch.randn(3, 6)]
    us = [torch.randn(5), torch.zeros(3)]
    s, u, v = power_iteration(ws, us, 3, backend=backend)
    assert torch.equal(s, torch.zeros(2))
    assert torch.equal(u[0], us[0]) and torch.equal(u[1], us[1])
    assert not torch.isnan(torch.cat(v)).any() and not torch.cat(v).any()


def test_outputs_carry_no_graph_and_inputs_untouched():
    w = torch.randn(6, 5, requires_grad=True)
    u = torch.randn(6)
    u_before = u.clone()
    for backend in ["torch"] + CPU_BACKENDS:
        s, us, vs = power_iteration([w], [u], 2, backend=backend)
        assert not s.requires_grad and not us[0].requires_grad and not vs[0].requires_grad
        assert torch.equal(u, u_before)


def test_half_weights_computed_in_float32():
    """fp16 weights give the σ of their float32 values (not a half-precision accumulation)."""
    ws, us = make_case([(64, 300)], torch.float16, 5)
    for backend in ["torch"] + CPU_BACKENDS:
        s16 = power_iteration(ws, us, 3, backend=backend)[0]
        s32 = power_iteration([ws[0].float()], us, 3, backend="torch")[0]
        torch.testing.assert_close(s16, s32, rtol=2e-5, atol=0)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_opcheck_cpu():
    ws, us = make_case([(5, 7), (1, 4), (9, 1)], torch.float32, 2)
    torch.library.opcheck(torch.ops.pyadvk.power_iteration.default, (ws, us, 2))
    ws16, us16 = make_case([(5, 7)], torch.bfloat16, 2)
    torch.library.opcheck(torch.ops.pyadvk.power_iteration.default, (ws16, us16, 1))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_cpp_checks_its_arguments():
    w, u = torch.randn(4, 3), torch.randn(4)
    op = torch.ops.pyadvk.power_iteration
    # (an empty list never reaches a kernel: the dispatcher has no tensor to dispatch on, and the
    # Python wrapper rejects it first; see test_bad_input)
    with pytest.raises(RuntimeError, match="n_iters must be >= 1, got 0"):
        op([w], [u], 0)
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be a 2-D matrix"):
        op([torch.randn(4, 3, 2)], [u], 1)
    with pytest.raises(RuntimeError, match=r"us\[0\] must have shape \(4,\)"):
        op([w], [torch.randn(3)], 1)
    with pytest.raises(RuntimeError, match=r"us\[0\] must be float32"):
        op([w], [u.double()], 1)
    with pytest.raises(RuntimeError, match="one vector per weight"):
        op([w, w], [u], 1)


def test_bad_input():
    w, u = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(ValueError, match=r"weights\[0\] must have at least 2 dim\(s\), got shape \(4,\)"):
        power_iteration([torch.randn(4)], [u])
    with pytest.raises(ValueError, match=r"weights\[1\] must have at least 2 dim\(s\), got shape \(\)"):
        power_iteration([w, torch.tensor(1.0)], [u, u])
    with pytest.raises(ValueError, match="n_iters must be >= 1, got 0"):
        power_iteration([w], [u], 0)
    with pytest.raises(TypeError, match="n_iters must be an int"):
        power_iteration([w], [u], 1.5)
    with pytest.raises(ValueError, match="weights must hold at least one matrix, got an empty list"):
        power_iteration([], [])
    with pytest.raises(ValueError, match=r"us must hold one vector per weight \(2\), got 1"):
        power_iteration([w, w], [u])
    with pytest.raises(ValueError, match=r"us\[0\] must have shape \(4,\) .* got \(3,\)"):
        power_iteration([w], [torch.randn(3)])
    with pytest.raises(TypeError, match="weights must be a list of tensors, got Tensor"):
        power_iteration(w, [u])
    with pytest.raises(TypeError, match=r"weights\[1\] must have the dtype of weights\[0\]"):
        power_iteration([w, w.half()], [u, u])
    with pytest.raises(TypeError, match=r"weights\[0\] must be float32, float16 or bfloat16"):
        power_iteration([w.double()], [u])


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_many_column_tasks(dtype):
    """Tall matrices split into many narrow column tasks (at most 512 KiB of W each: 48 columns of
    a 2100-row float32 matrix, 112 in 16 bits), whose shares of W v are summed per matrix, next to
    a matrix with u = 0 on most rows (skipped rows) and a zero matrix."""
    ws, us = make_case([(2100, 300), (40, 900), (300, 70)], dtype, seed=5, zero=(2,))
    us[1][5:] = 0.0
    ref = power_iteration(ws, us, 3, backend="torch")
    assert_close_sigma(power_iteration(ws, us, 3, backend="cpp"), ref, f"cpp {dtype}")


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_cpu_instruction_set(isa):
    """The reference tests on each copy of the cpp loops this CPU supports."""
    run_on_cpu_isa(isa, __file__, "cpp and (matches_reference or many_column_tasks or rank_one or zero_matrix)")
