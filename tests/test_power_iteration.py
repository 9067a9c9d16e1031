"""Every body of the batched power iteration against the torch reference, the spectral norm it
converges to (at the rate exact arithmetic predicts), cold starts, extreme and non-finite values,
the Triton launch path (device context, cached plan, no empty grid), and every bad-input path."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.ops import power_iteration
from pyadvk.ops.power_iteration import POWER_ITERATION, random_unit_vectors
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


# 65 launches: ~12 s through the Triton interpreter, so that body runs in the slow tier only
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in ["torch"] + CPU_BACKENDS]
)
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
    torch.library.opcheck(torch.ops.pyadvk.power_iteration_packed.default, (ws, torch.cat(us), 2))
    ws16, us16 = make_case([(5, 7)], torch.bfloat16, 2)
    torch.library.opcheck(torch.ops.pyadvk.power_iteration_packed.default, (ws16, us16[0], 1))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_cpp_checks_its_arguments():
    w, u = torch.randn(4, 3), torch.randn(4)
    op = torch.ops.pyadvk.power_iteration_packed
    # (an empty list never reaches a kernel: the dispatcher has no tensor to dispatch on, and the
    # Python wrapper rejects it first; see test_bad_input)
    with pytest.raises(RuntimeError, match="n_iters must be >= 1, got 0"):
        op([w], u, 0)
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be a 2-D matrix"):
        op([torch.randn(4, 3, 2)], u, 1)
    with pytest.raises(RuntimeError, match=r"u must have shape \(4,\) \(the rows of all weights, packed\)"):
        op([w], torch.randn(3), 1)
    with pytest.raises(RuntimeError, match=r"u must have shape \(8,\)"):
        op([w, w], u, 1)
    with pytest.raises(RuntimeError, match="u must be float32"):
        op([w], u.double(), 1)
    with pytest.raises(RuntimeError, match="u must be contiguous"):
        op([w], torch.randn(8)[::2], 1)
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have the dtype of weights\[0\]"):
        op([w, w.half()], torch.randn(8), 1)


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
    with pytest.raises(TypeError, match="us must be a list of tensors or None"):
        power_iteration([w], u)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        power_iteration([w], None, generator=0)
    with pytest.raises(ValueError, match="generator seeds a cold start: pass it with us=None"):
        power_iteration([w], [u], generator=torch.Generator())


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
@pytest.mark.slow  # a subprocess per instruction set running the op tests: 9-30 s each
@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_cpu_instruction_set(isa):
    """The reference tests on each copy of the cpp loops this CPU supports."""
    run_on_cpu_isa(
        isa,
        __file__,
        "cpp and (matches_reference or many_column_tasks or rank_one or zero_matrix or extreme or non_finite)",
    )


ALL_BACKENDS = ["torch"] + CPU_BACKENDS


def test_cold_start_is_seeded_and_the_same_on_every_body():
    """us=None starts from random unit vectors: the same seed gives the same vectors and results
    (on every body), another seed other vectors."""
    ws, _ = make_case([(9, 5), (4, 3, 2)], torch.float32, 7)
    starts = random_unit_vectors([9, 4], torch.device("cpu"), torch.Generator().manual_seed(3))
    assert [tuple(u.shape) for u in starts] == [(9,), (4,)]
    for u in starts:
        assert u.dtype == torch.float32
        torch.testing.assert_close(u.norm(), torch.tensor(1.0))
    ref = power_iteration(ws, starts, 2, backend="torch")
    for backend in ALL_BACKENDS:
        out = power_iteration(ws, None, 2, generator=torch.Generator().manual_seed(3), backend=backend)
        assert_close_sigma(out, ref, f"{backend} cold start")
    other = power_iteration(ws, None, 1, generator=torch.Generator().manual_seed(4), backend="torch")
    assert not torch.equal(other[1][0], power_iteration(ws, None, 1, generator=torch.Generator().manual_seed(3))[1][0])
    torch.manual_seed(11)  # without a generator: torch's global RNG
    a = power_iteration(ws, n_iters=1, backend="torch")
    torch.manual_seed(11)
    b = power_iteration(ws, n_iters=1, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][1], b[1][1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_scales_are_exact(backend, dtype):
    """σ(2^k W) = 2^k σ(W) bit for bit from 2^-100 (~1e-30) to 2^100 (~1e30): float64 norms neither
    overflow (float32 squares do beyond 1.8e19) nor underflow; u and v do not change."""
    shapes = [(30, 20), (3, 700)] if backend != "triton" else [(12, 9), (3, 70)]
    ws, us = make_case(shapes, dtype, 8)
    base = power_iteration(ws, us, 3, backend=backend)
    for k in (100, -100, 60):
        scaled = power_iteration([w * 2.0**k for w in ws], us, 3, backend=backend)
        assert torch.equal(scaled[0], base[0] * 2.0**k), (k, scaled[0], base[0])
        for a, b in zip(scaled[1] + scaled[2], base[1] + base[2]):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_extreme_entries_match_the_svd(backend):
    """1e30 entries (σ ~ 1e31, within float32's range): σ within float32 rounding of the float64
    SVD after enough iterations on a matrix with a clear spectral gap; 1e-30 entries likewise."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(12, generator=gen), torch.randn(9, generator=gen)
    w = torch.outer(a, b) + 0.01 * torch.randn(12, 9, generator=gen)  # σ2/σ1 ~ 0.01
    for scale in (1e30, 1e-30):
        big = w * scale
        exact = torch.linalg.matrix_norm(big.double(), ord=2)
        s = power_iteration([big], [torch.ones(12)], 4, backend=backend)[0][0]
        assert torch.isfinite(s) and s > 0
        torch.testing.assert_close(s.double(), exact, rtol=1e-5, atol=0)
    # σ beyond float32's range (4e38 here; Wᵀu still fits) is inf, never a finite number below it
    s = power_iteration([torch.full((2, 2), 2e38)], [torch.tensor([1.0, 0.0])], 1, backend=backend)[0][0]
    assert s == float("inf"), s


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gives_nan_never_a_finite_sigma(backend, bad):
    """A NaN or inf in W (also in a row where u is 0, and in a 16-bit matrix) or in u gives σ = NaN,
    v = NaN and u unchanged for that matrix; the other matrices are unaffected."""
    ws, us = make_case([(6, 5), (4, 7), (3, 3)], torch.float32, 9)
    ws[0][2, 3] = bad
    us[0][2] = 0.0  # 0 · bad must not vanish
    us[2][1] = bad
    s, u, v = power_iteration(ws, us, 2, backend=backend)
    for i in (0, 2):
        assert s[i].isnan(), (i, s)
        assert v[i].isnan().all(), v[i]
        torch.testing.assert_close(u[i], us[i], rtol=0, atol=0, equal_nan=True)
    clean = power_iteration(ws[1:2], us[1:2], 2, backend="torch")
    torch.testing.assert_close(s[1:2], clean[0], rtol=2e-5, atol=0)
    w16 = torch.randn(5, 4).to(torch.bfloat16)
    w16[0, 0] = bad
    assert power_iteration([w16], [torch.ones(5)], 1, backend=backend)[0][0].isnan()


def predicted_sigma(w: torch.Tensor, u0: torch.Tensor, k: int) -> torch.Tensor:
    """σ after k iterations in exact arithmetic, from the SVD: with a_i the components of u0 along
    the left singular vectors and ρ_i = σ_i/σ_1, σ_k² = σ_1² Σ a_i² ρ_i^(4k) / Σ a_i² ρ_i^(4k-2)."""
    left, sv, _ = torch.linalg.svd(w.double(), full_matrices=False)
    a2 = (left.T @ u0.double()) ** 2
    rho = sv / sv[0]
    return sv[0] * torch.sqrt((a2 * rho ** (4 * k)).sum() / (a2 * rho ** (4 * k - 2)).sum())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_converges_as_exact_arithmetic_predicts(backend):
    """After k iterations σ is what exact arithmetic gives from the same start (the SVD formula of
    predicted_sigma) to float32 rounding, and never above the spectral norm; random matrices have
    small spectral gaps, so σ is still visibly below the norm."""
    shapes = [(40, 30), (16, 27), (25, 25)] if backend != "triton" else [(12, 9), (8, 14)]
    k = 30 if backend != "triton" else 6
    ws, us = make_case(shapes, torch.float32, 4)
    s = power_iteration(ws, us, k, backend=backend)[0]
    for i, (w, u) in enumerate(zip(ws, us)):
        exact = torch.linalg.matrix_norm(w.double(), ord=2)
        torch.testing.assert_close(s[i].double(), predicted_sigma(w, u / u.norm(), k), rtol=2e-5, atol=0)
        assert s[i] <= exact * (1 + 1e-6)


def test_all_matrices_without_columns_or_rows():
    """Matrices with no columns (or no rows) give σ = 0 on every body; the Triton body launches no
    empty grid for them."""
    ws = [torch.zeros(3, 0), torch.zeros(0, 4)]
    for backend in ALL_BACKENDS:
        s, u, v = power_iteration(ws, [torch.ones(3), torch.ones(0)], 2, backend=backend)
        assert torch.equal(s, torch.zeros(2)) and torch.equal(u[0], torch.ones(3))
        assert v[0].shape == (0,) and torch.equal(v[1], torch.zeros(4))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton is not installed")
def test_triton_launch_path(monkeypatch):
    """The Triton body launches every kernel inside the device context of the weights' device
    (checked with a spy: on CPU the real context is a no-op, on CUDA it is torch.cuda.device),
    reuses one cached plan for the same weights (no table built or copied again), builds a new one
    for other weights, and launches no empty grid."""
    from pyadvk.kernels import power_iteration as kmod

    inside: list[torch.device] = []  # the device whose context is entered right now
    launches = []
    real_wrap = kmod.wrap_triton

    @contextlib.contextmanager
    def spy_context(device):
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    def spy_wrap(kernel):
        launcher = real_wrap(kernel)

        class Grid:
            def __getitem__(self, grid):
                launches.append((kernel.fn.__name__, grid, list(inside)))
                return launcher[grid]

        return Grid()

    monkeypatch.setattr(kmod, "_device_context", spy_context)
    monkeypatch.setattr(kmod, "wrap_triton", spy_wrap)
    kmod._PLANS.clear()
    ws, us = make_case([(5, 7), (3, 0), (0, 2)], torch.float32, 1)
    power_iteration(ws, us, 1, backend="triton")
    assert {name for name, _, _ in launches} == {
        "_wt_u_tile_kernel", "_reduce_v_kernel", "_normalize_v_kernel", "_w_v_kernel", "_normalize_u_kernel"
    }  # fmt: skip
    for name, grid, devices in launches:
        assert devices == [ws[0].device], f"{name} launched outside the weights' device context: {devices}"
        assert grid[0] > 0, f"{name} launched on an empty grid"
    assert len(kmod._PLANS) == 1
    plan = next(iter(kmod._PLANS.values()))
    power_iteration(ws, us, 1, backend="triton")
    assert len(kmod._PLANS) == 1 and next(iter(kmod._PLANS.values())) is plan
    power_iteration([w.clone() for w in ws], us, 1, backend="triton")  # other memory: another plan
    assert len(kmod._PLANS) == 2


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton is not installed")
def test_triton_device_context_is_the_tensors_device():
    """The real context helper: torch.cuda.device with the tensor's index for CUDA tensors (built
    without entering it, which needs a GPU), a no-op for CPU tensors."""
    from pyadvk.kernels import power_iteration as kmod

    ctx = kmod._device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(kmod._device_context(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton is not installed")
def test_triton_reads_weights_in_place_or_packed(monkeypatch):
    """In eager mode the weights are read where they lie, at offsets from weights[0] (also
    negative: a later weight at a lower address); weights at a fractional element offset, and the
    traced path (fake tensors, torch.compile), use one packed buffer; all agree."""
    from pyadvk.kernels import power_iteration as kmod

    buf = torch.randn(200)
    ws = [buf[100:160].view(6, 10), buf[:30].view(5, 6)]  # weights[1] below weights[0]
    us = [torch.randn(6), torch.randn(5)]
    ref = power_iteration(ws, us, 2, backend="torch")
    assert_close_sigma(power_iteration(ws, us, 2, backend="triton"), ref, "in place")
    plan = kmod._eager_plan(ws)
    assert plan is not None and plan.meta[kmod.META + kmod.W_OFF].item() == -100
    odd = torch.frombuffer(bytearray(4 * 31), dtype=torch.float32, offset=2, count=30).view(5, 6)
    odd.copy_(ws[1])
    assert kmod._eager_plan([ws[0], odd]) is None
    assert_close_sigma(power_iteration([ws[0], odd], us, 2, backend="triton"), ref, "fractional offset")
    monkeypatch.setattr(kmod, "_traced", lambda weights: True)
    assert_close_sigma(power_iteration(ws, us, 2, backend="triton"), ref, "packed")
