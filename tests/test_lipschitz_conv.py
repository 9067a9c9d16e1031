"""Convolution operator norms: power iteration and the Gram bound against the 2-norm of the
explicitly built convolution matrix, and against FFT + per-frequency SVD for circular padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pyadvk.lipschitz import ConvNormState, conv_norm_bound, conv_operator_norm
from pyadvk.lipschitz import conv as conv_norms

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_matrix(conv: nn.Module, input_shape) -> torch.Tensor:
    """The matrix of the layer's convolution (no bias): apply it to every basis vector."""
    d = torch.Size(input_shape).numel()
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *input_shape)
    with torch.no_grad():
        out = conv_norms.linear_part(conv, basis, conv.weight.double())
    return out.reshape(d, -1).T


def true_norm(conv, input_shape) -> float:
    return float(torch.linalg.matrix_norm(dense_matrix(conv, input_shape), ord=2))


def check(conv, shape, *, power_iters=600, tight_bound=False):
    exact = true_norm(conv, shape)
    sigma, state = conv_operator_norm(conv, shape, power_iters, generator=torch.Generator().manual_seed(0))
    assert sigma.dtype == torch.float32 and sigma.dim() == 0
    # a Rayleigh-type estimate: never above the norm, and converged after enough iterations
    assert float(sigma) <= exact * (1 + 1e-5) + 1e-7
    assert float(sigma) >= exact * (1 - 2e-3), (float(sigma), exact)
    bound = float(conv_norm_bound(conv, shape, 8))
    assert bound >= exact * (1 - 1e-5), (bound, exact, conv)
    if tight_bound:
        assert bound <= exact * 1.02, (bound, exact)
    return exact, float(sigma), bound, state


CASES = [
    # (dims, c_in, c_out, kernel, stride, padding, dilation, groups, input spatial)
    (2, 3, 4, 3, 1, 1, 1, 1, (6, 5)),
    (2, 2, 5, 3, 2, 1, 1, 1, (7, 6)),
    (2, 4, 4, 3, 1, 2, 2, 1, (6, 6)),
    (2, 4, 6, 3, 1, 1, 1, 2, (5, 5)),
    (2, 4, 4, 3, 1, 1, 1, 4, (5, 4)),
    (2, 3, 2, (3, 1), (1, 2), (1, 0), 1, 1, (5, 6)),
    (2, 2, 3, 1, 1, 0, 1, 1, (4, 4)),
    (2, 1, 1, 5, 1, 0, 1, 1, (7, 7)),
    (1, 3, 4, 5, 1, 2, 1, 1, (11,)),
    (1, 2, 3, 3, 3, 0, 2, 1, (13,)),
    (3, 2, 3, 3, 1, 1, 1, 1, (3, 4, 3)),
    (3, 2, 2, 2, 2, 0, 1, 2, (4, 4, 4)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_zero_padding_against_dense_matrix(case):
    d, cin, cout, k, s, p, dil, g, spatial = case
    torch.manual_seed(hash(case) % 2**31)
    conv = CONV[d](cin, cout, k, stride=s, padding=p, dilation=dil, groups=g)
    check(conv, (cin, *spatial))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, (4, 3), padding=padding)  # 'same' with an even kernel pads unevenly
    check(conv, (3, 6, 5))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, 2])
def test_other_padding_modes(mode, padding):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode)
    exact, _, bound, _ = check(conv, (2, 5, 6))
    # the bound pays at most sqrt(copies) of the padding map on top of the circulant norm
    grid, factor = conv_norms.circulant_plan(conv, (5, 6))
    assert factor >= 1 and bound <= factor * float(conv_norms.circular_norm_exact(conv, (2, 5, 6))) * 1.02


@given(
    cin=st.integers(1, 4),
    cout=st.integers(1, 4),
    k=st.sampled_from([1, 3, 5]),
    n=st.integers(5, 8),
    m=st.integers(5, 8),
    dil=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_circular_matches_per_frequency_svd(cin, cout, k, n, m, dil, seed):
    """Circular padding keeping the size, stride 1: the layer is a circulant operator whose norm is
    max over frequencies of the SVD of the kernel's DFT (Sedghi et al. 2019)."""
    torch.manual_seed(seed)
    p = dil * (k - 1) // 2
    if p > min(n, m):
        return
    conv = nn.Conv2d(cin, cout, k, padding=p, dilation=dil, padding_mode="circular")
    shape = (cin, n, m)
    sedghi = float(conv_norms.circular_norm_exact(conv, shape))
    exact = true_norm(conv, shape)
    assert abs(sedghi - exact) <= 1e-9 * max(1.0, exact)
    _, _, bound, _ = check(conv, shape, tight_bound=True)
    # with the rescaled Gram iteration the bound equals the SVD value up to the Frobenius slack
    assert bound <= sedghi * min(cin, cout) ** (1 / 2**9) * (1 + 1e-5)


def test_gram_bound_matrices():
    gen = torch.Generator().manual_seed(4)
    mats = torch.randn(5, 7, 3, generator=gen)
    mats[2] = 0
    exact = torch.linalg.matrix_norm(mats.double(), ord=2)
    for t in (1, 3, 8):
        b = conv_norms.gram_bound(mats, t)
        assert (b >= exact * (1 - 1e-6)).all() and b[2] == 0 and not torch.isnan(b).any()
    assert torch.allclose(conv_norms.gram_bound(mats, 10), exact, rtol=1e-4)
    huge = torch.randn(2, 6, 6, generator=gen) * 1e30  # rescaling: no overflow in float32
    assert torch.allclose(conv_norms.gram_bound(huge, 10), torch.linalg.matrix_norm(huge.double(), ord=2), rtol=1e-4)


def test_warm_start_continues():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    shape = (3, 6, 6)
    s_cold, state = conv_operator_norm(conv, shape, 2, generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        s, state = conv_operator_norm(conv, shape, 5, state=state)
    s_ref, _ = conv_operator_norm(conv, shape, 52, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert float(s) >= float(s_cold) - 1e-6
    assert isinstance(state, ConvNormState) and state.v.shape == (1, *shape) and state.u.shape == (1, 3, 6, 6)


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("stride", [1, 2])
def test_adjoint(mode, stride):
    """<A x, y> = <x, Aᵀ y> for every padding mode (the transposed convolution is the adjoint)."""
    gen = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=(1, 2), padding_mode=mode).double()
    x = torch.randn(1, 3, 7, 6, generator=gen, dtype=torch.float64)
    ax = conv_norms.linear_part(conv, x, conv.weight)
    y = torch.randn(ax.shape, generator=gen, dtype=torch.float64)
    aty = conv_norms.adjoint(conv, y, conv.weight, x.shape)
    assert aty.shape == x.shape
    torch.testing.assert_close((ax * y).sum(), (x * aty).sum(), rtol=1e-12, atol=1e-12)


def test_zero_kernel_gives_zero():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    s, state = conv_operator_norm(conv, (2, 4, 4), 3)
    assert float(s) == 0 and not torch.isnan(state.v).any() and state.v.norm() > 0
    assert float(conv_norm_bound(conv, (2, 4, 4))) == 0


def test_half_precision_layer():
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    exact = true_norm(conv, (2, 5, 5))
    conv_bf = nn.Conv2d(2, 2, 3, padding=1).to(torch.bfloat16)
    with torch.no_grad():
        conv_bf.weight.copy_(conv.weight)
    exact_bf = true_norm(conv_bf.float(), (2, 5, 5))
    s, _ = conv_operator_norm(conv_bf, (2, 5, 5), 1500)
    assert s.dtype == torch.float32 and abs(float(s) - exact_bf) <= 2e-3 * exact_bf
    assert float(conv_norm_bound(conv_bf, (2, 5, 5))) >= exact_bf * (1 - 1e-5)
    assert abs(exact - exact_bf) < 0.05 * exact


def test_reshaped_norm_differs():
    """torch.nn.utils.spectral_norm's reshaped-kernel norm is not the operator norm: an all-ones
    k×k kernel has reshaped norm k and operator norm close to k² on a large input."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False, padding_mode="circular")
    with torch.no_grad():
        conv.weight.fill_(1.0)
    reshaped = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(1, -1), ord=2))
    s, _ = conv_operator_norm(conv, (1, 8, 8), 50)
    assert abs(reshaped - 3.0) < 1e-6 and abs(float(s) - 9.0) < 1e-4
    assert abs(float(conv_norm_bound(conv, (1, 8, 8))) - 9.0) < 1e-3


def test_bad_input():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"input_shape must be \(C_in, H, W\) .* got \(3, 8\)"):
        conv_operator_norm(conv, (3, 8))
    with pytest.raises(
        ValueError, match=r"input_shape \(2, 8, 8\) does not fit .*Conv2d.*2 channels, the layer takes 3"
    ):
        conv_norm_bound(conv, (2, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape must be .* got \(1, 3, 8, 8\)"):
        conv_operator_norm(conv, (1, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the kernel extent"):
        conv_operator_norm(nn.Conv2d(3, 4, 5), (3, 3, 3))
    with pytest.raises(ValueError, match=r"reflect padding 2 needs spatial sizes > it"):
        conv_operator_norm(nn.Conv2d(3, 4, 5, padding=2, padding_mode="reflect"), (3, 2, 8))
    with pytest.raises(ValueError, match="n_iters must be >= 1, got 0"):
        conv_operator_norm(conv, (3, 8, 8), 0)
    with pytest.raises(ValueError, match="n_iters must be >= 1, got 0"):
        conv_norm_bound(conv, (3, 8, 8), 0)
    with pytest.raises(TypeError, match="conv must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got Linear"):
        conv_operator_norm(nn.Linear(3, 3), (3,))
    _, state = conv_operator_norm(conv, (3, 8, 8), 1)
    with pytest.raises(
        ValueError, match=r"state holds vectors for input shape \(3, 8, 8\), not input_shape \(3, 9, 9\)"
    ):
        conv_operator_norm(conv, (3, 9, 9), 1, state=state)
    with pytest.raises(ValueError, match="weight must have the shape of conv.weight"):
        conv_operator_norm(conv, (3, 8, 8), 1, weight=torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"weight must have at least 3 dim\(s\)"):
        conv_operator_norm(conv, (3, 8, 8), 1, weight=torch.randn(4, 27))


def test_cold_start_generator_and_huge_kernels():
    """conv_operator_norm's cold start is drawn from generator= (the same seed, the same σ); a
    kernel of 1e30 entries gives 1e30 times its norm (float64 norms), a NaN kernel NaN when
    check_values=False (never a finite σ)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    a, _ = conv_operator_norm(conv, (2, 6, 6), 5, generator=torch.Generator().manual_seed(3))
    b, _ = conv_operator_norm(conv, (2, 6, 6), 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    state = ConvNormState.random((2, 6, 6), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(state.v.norm(), torch.tensor(1.0))
    exact = true_norm(conv, (2, 6, 6))
    big = conv.weight.detach() * 1e30
    sigma, _ = conv_operator_norm(conv, (2, 6, 6), 300, weight=big)
    assert abs(float(sigma) / 1e30 - exact) <= 2e-3 * exact, (float(sigma), exact)
    bad = conv.weight.detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    sigma, _ = conv_operator_norm(conv, (2, 6, 6), 3, weight=bad, check_values=False)
    assert sigma.isnan()
