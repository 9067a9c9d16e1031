"""channel_stats_update's cuda and triton bodies on a GPU, against the torch reference; opcheck of
both ops (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from pyadvk.ops import channel_stats as cs
from tests.test_channel_stats import activations, assert_states_equal, make_state, run_batches

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]


def _cuda_state(channels, **kw):
    return make_state(channels, **kw).to("cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3), (1, 4), (5, 3, 9, 11), (3, 2, 4, 5, 6), (256, 256, 8, 8), (3, 5, 223, 221)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_on_gpu(backend, dtype, shape, channels_last):
    if channels_last and len(shape) < 4:
        pytest.skip("channels_last needs 4 or 5 dims")
    x = activations(shape, dtype, seed=1, ties=True, channels_last=channels_last).cuda()
    m = cs.quantile_capacity(0.01, math.prod(shape) // shape[1])
    want = run_batches("torch", _cuda_state(shape[1], topk=8, m=m), [x[: shape[0] // 2], x[shape[0] // 2 :]])
    got = run_batches(backend, _cuda_state(shape[1], topk=8, m=m), [x[: shape[0] // 2], x[shape[0] // 2 :]])
    assert_states_equal(got.to("cpu"), want.to("cpu"), f"{backend} {shape} {dtype}")
    t_got, _ = cs.quantile_threshold(got, 0.01)
    t_want = torch.nanquantile(x.float().transpose(0, 1).reshape(shape[1], -1).cpu(), 0.99, dim=1)
    assert torch.equal(t_got, t_want)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "shape, channels_last, bins",
    [
        ((64, 4, 64, 64), False, 64),  # 262,144 values per channel: 4 sample groups
        ((64, 4, 64, 64), True, 64),  # the same, channels innermost (rows kernel)
        ((48, 3, 64, 64), False, 3000),  # more than 2048 bins: the global-atomic fallback
        ((48, 3, 64, 64), True, 5000),
        ((600_000, 48), False, 64),  # (N, C) at size: 10 groups, channels innermost
    ],
)
def test_groups_layouts_and_many_bins_on_gpu(backend, shape, channels_last, bins):
    """Issue 14: more than 2 sample groups (merged in one device pass), channels_last and (N, C)
    read along the contiguous dimension, histograms with more than 2048 bins."""
    x = activations(shape, seed=4, ties=True, channels_last=channels_last).cuda()
    m = 64
    want = run_batches("torch", _cuda_state(shape[1], topk=8, bins=bins, m=m), [x[: shape[0] // 3], x[shape[0] // 3 :]])
    got = run_batches(backend, _cuda_state(shape[1], topk=8, bins=bins, m=m), [x[: shape[0] // 3], x[shape[0] // 3 :]])
    assert_states_equal(got.to("cpu"), want.to("cpu"), f"{backend} {shape} bins={bins}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", ["+inf", "-inf", "both", "nan+inf", "all-inf"])
def test_nonfinite_on_gpu(backend, case):
    from tests.test_channel_stats import _nonfinite_batches

    batches = [b.cuda() for b in _nonfinite_batches(case)]
    want = run_batches("torch", _cuda_state(4, topk=4, m=5), batches).to("cpu")
    got = run_batches(backend, _cuda_state(4, topk=4, m=5), batches).to("cpu")
    for f in ("count", "nan_count", "minimum", "maximum", "hist", "topk_values", "topk_sample", "topk_pos", "qbuf"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    for f in ("mean", "m2"):
        a, b = getattr(got, f), getattr(want, f)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), (f, a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_large_offset_on_gpu(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = 1e4 + torch.randn(4_000_000, 2, device="cuda", generator=g)
    state = run_batches(backend, _cuda_state(2, m=0), [x[:1_500_000], x[1_500_000:]])
    want = x.double().var(0, unbiased=False).cpu()
    assert bool(((state.variance().cpu() - want).abs() / want < 1e-5).all())


@pytest.mark.parametrize("op", ["channel_stats_update_", "channel_stats_update_triton_"])
def test_opcheck_gpu(op):
    if op.endswith("triton_"):
        import pyadvk.kernels  # noqa: F401
    x = activations((3, 4, 5, 6), seed=2).cuda()
    state = _cuda_state(4)
    torch.library.opcheck(getattr(torch.ops.pyadvk, op), (*state.tensors(), x, 0, state.lo, state.hi))
