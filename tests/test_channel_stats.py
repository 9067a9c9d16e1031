"""channel_stats_update: every body against the torch reference on fresh random inputs (NaNs,
ties, layouts, dtypes), streaming equals one pass, merging equals one pass, exact quantile
thresholds, the histogram sketch's error bound, opcheck of the CPU op, and bad input."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyadvk.ops import channel_stats as cs
from tests.conftest import available
from tests.utils import ISA_ORDER, run_on_cpu_isa

BODIES = available(cs.UPDATE, "cpu")
FAST = [b for b in BODIES if b != "triton"]
EXACT_FIELDS = ("count", "nan_count", "minimum", "maximum", "hist", "topk_values", "topk_sample", "topk_pos", "qbuf")


def make_state(channels, topk=5, bins=7, lo=-1.5, hi=2.0, m=9):
    return cs.ChannelStats.create(channels, topk=topk, bins=bins, lo=lo, hi=hi, quantile_capacity=m)


def activations(shape, dtype=torch.float32, *, seed=0, nan=0.05, ties=False, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if ties:  # few distinct values: many ties in the top-k
        x = torch.round(x * 2) / 2
    x[torch.rand(shape, generator=g) < nan] = math.nan
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def assert_states_equal(got: cs.ChannelStats, want: cs.ChannelStats, what=""):
    for f in EXACT_FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert torch.equal(a, b), f"{what}: {f} differs\n got {a}\nwant {b}"
    scale = want.m2.abs() + 1.0
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-6, atol=1e-6, msg=f"{what}: mean")
    assert bool(((got.m2 - want.m2).abs() <= 1e-5 * scale).all()), f"{what}: m2 {got.m2} vs {want.m2}"


def run_batches(body, state, batches):
    offset = 0
    for x in batches:
        cs.channel_stats_update(state, x, offset, backend=body)
        offset += x.shape[0]
    return state


SHAPES = [(7, 3), (1, 4), (5, 3, 9, 11), (3, 2, 4, 5, 6), (2, 5, 70, 70)]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_body_matches_reference(body, shape, dtype):
    if body == "triton" and math.prod(shape) > 20000:
        pytest.skip("large shape: slow under the Triton interpreter")
    x = activations(shape, dtype, seed=zlib.crc32(repr((shape, str(dtype))).encode()) % 1000)
    want = run_batches("torch", make_state(shape[1]), [x])
    got = run_batches(body, make_state(shape[1]), [x])
    assert_states_equal(got, want, f"{body} {shape} {dtype}")


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (3, 4, 2, 3, 5)])
def test_channels_last_and_ties(body, shape):
    x = activations(shape, seed=3, ties=True, channels_last=True)
    assert not x.is_contiguous()
    want = run_batches("torch", make_state(shape[1], topk=8), [x.contiguous()])
    got = run_batches(body, make_state(shape[1], topk=8), [x])
    assert_states_equal(got, want, f"{body} channels_last")
    # ties really happen, and the smaller (sample, position) wins them
    vals, samples, pos = want.topk_values, want.topk_sample, want.topk_pos
    keys = samples * (x[0, 0].numel()) + pos
    tie = vals[:, 1:] == vals[:, :-1]
    assert bool(tie.any())
    assert bool((keys[:, 1:][tie] > keys[:, :-1][tie]).all())


def test_reference_topk_is_the_definition():
    x = activations((6, 2, 3, 3), seed=5, ties=True)
    state = run_batches("torch", make_state(2, topk=10, m=0), [x])
    v = x.permute(1, 0, 2, 3).reshape(2, -1)
    for c in range(2):
        entries = [(float(val), i) for i, val in enumerate(v[c].tolist()) if not math.isnan(val)]
        entries.sort(key=lambda e: (-e[0], e[1]))
        best = entries[:10]
        assert state.topk_values[c].tolist() == [e[0] for e in best]
        assert state.topk_sample[c].tolist() == [e[1] // 9 for e in best]
        assert state.topk_pos[c].tolist() == [e[1] % 9 for e in best]
        finite = v[c][~v[c].isnan()].double()
        assert state.count[c] == finite.numel()
        assert state.nan_count[c] == v[c].isnan().sum()
        torch.testing.assert_close(state.mean[c], finite.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.m2[c], ((finite - finite.mean()) ** 2).sum(), rtol=1e-12, atol=1e-12)
        assert torch.equal(state.hist[c, 1:-1], torch.histc(finite.float(), 7, -1.5, 2.0).long())
        assert state.hist[c, 0] == (finite < -1.5).sum() and state.hist[c, -1] == (finite > 2.0).sum()


@pytest.mark.parametrize("body", BODIES)
def test_streaming_equals_one_pass(body):
    full = activations((9, 3, 4, 5), seed=7, ties=True)
    batches = [full[:4], full[4:5], full[5:]]
    one = run_batches(body, make_state(3, topk=6, m=12), [full])
    streamed = run_batches(body, make_state(3, topk=6, m=12), batches)
    assert_states_equal(streamed, one, f"{body} streamed")
    assert streamed.samples == 9


@pytest.mark.parametrize("body", FAST)
@pytest.mark.parametrize("m", [1, 25, 400])
def test_streaming_quantile_buffer_many_batches(body, m):
    """The quantile buffer over a long stream: it fills within the first batches (m = 1, 25) or
    never (m = 400 > 360 values); later batches bring candidates that beat its worst value, ties
    with it, extremes and NaNs. Every split equals one pass of the torch reference."""
    x = activations((30, 3, 3, 4), seed=21, ties=True, nan=0.1)
    x[3, 0, 0, :2] = 50.0
    x[8, 1, 1, 1] = -50.0
    x[20, 2] = -50.0
    x[25, 0] = 9.0  # late values that must enter a full buffer
    want = run_batches("torch", make_state(3, topk=4, m=m), [x])
    sizes = [1, 2, 3, 5, 1, 7, 11]
    batches = list(torch.split(x, sizes))
    got = run_batches(body, make_state(3, topk=4, m=m), batches)
    assert_states_equal(got, want, f"{body} m={m}")


@pytest.mark.parametrize("body", BODIES)
def test_fewer_values_than_k_and_all_nan_channel(body):
    x = torch.tensor([[1.0, math.nan], [2.0, math.nan]])
    state = run_batches(body, make_state(2, topk=4, m=3), [x])
    assert state.count.tolist() == [2, 0] and state.nan_count.tolist() == [0, 2]
    assert state.topk_values[0].tolist() == [2.0, 1.0, -math.inf, -math.inf]
    assert state.topk_sample[0].tolist() == [1, 0, -1, -1]
    assert state.topk_sample[1].tolist() == [-1] * 4
    assert state.minimum.tolist() == [1.0, math.inf] and state.maximum.tolist() == [2.0, -math.inf]
    assert state.qbuf[0].tolist() == [2.0, 1.0, -math.inf]


@pytest.mark.parametrize("body", FAST)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 5),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    k=st.integers(1, 9),
    m=st.integers(0, 20),
    seed=st.integers(0, 2**16),
    split=st.integers(0, 6),
)
def test_hypothesis_streams(body, n, c, h, w, k, m, seed, split):
    x = activations((n, c, h, w), seed=seed, ties=seed % 2 == 0, nan=0.1)
    split = min(split, n)
    want = run_batches("torch", make_state(c, topk=k, m=m), [x])
    got = run_batches(body, make_state(c, topk=k, m=m), [x[:split], x[split:]])
    assert_states_equal(got, want, body)


@pytest.mark.parametrize("body", BODIES)
def test_large_offset_keeps_variance_accurate(body):
    """Values 1e4 + N(0, 1): the float32 shifted block sums merged in float64 keep the variance."""
    n = 1_000_000 if body != "triton" else 200_000
    g = torch.Generator().manual_seed(11)
    x = (1e4 + torch.randn(n // 2, 2, generator=g)).float()
    state = run_batches(body, make_state(2, m=0), [x[: n // 4], x[n // 4 :]])
    exact = x.double()
    want_var = exact.var(0, unbiased=False)
    got_var = state.variance()
    assert bool(((got_var - want_var).abs() / want_var < 1e-5).all()), (got_var, want_var)
    assert bool(((state.mean - exact.mean(0)).abs() < 1e-6 * 1e4).all())


# ---------------------------------------------------------------------------------------------
# Non-finite activations (issue 13 item 6): one behaviour, defined by the torch body.


def _nonfinite_batches(case: str):
    """Two batches (4, 4, 3) whose channel 0 stays finite; channels 1-3 get the case's values."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(8, 4, 3, generator=g)
    pos, neg = math.inf, -math.inf
    if case == "+inf":
        x[1, 1, 2] = x[6, 2, 0] = x[7, 3, :] = pos
    elif case == "-inf":
        x[1, 1, 2] = x[6, 2, 0] = x[7, 3, :] = neg
    elif case == "both":
        x[1, 1, 2], x[6, 1, 0] = pos, neg  # both signs in one channel: mean NaN
        x[2, 2, 1], x[5, 3, 1] = pos, neg
    elif case == "nan+inf":
        x[0, 1, :], x[3, 1, 1] = math.nan, pos
        x[:, 2, :] = math.nan  # only NaN: no values at all
        x[4, 3, 2], x[5, 3, 0] = neg, math.nan
    elif case == "all-inf":
        x[:, 1:, :] = pos
    return [x[:4], x[4:]]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("case", ["+inf", "-inf", "both", "nan+inf", "all-inf"])
def test_nonfinite_activations(body, case):
    """±inf are values: counted, in min/max, the under/overflow columns, the top-k and the
    buffer; NaN is only counted in nan_count; a channel that saw ±inf has mean +inf, -inf or NaN
    (both signs) and m2 NaN, whatever the batches. Every body gives the torch body's state."""
    batches = _nonfinite_batches(case)
    want = run_batches("torch", make_state(4, topk=4, m=5), batches)
    got = run_batches(body, make_state(4, topk=4, m=5), batches)
    for f in EXACT_FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), (f, getattr(got, f), getattr(want, f))
    for f in ("mean", "m2"):
        a, b = getattr(got, f), getattr(want, f)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), (f, a, b)
        fin = torch.isfinite(b)  # float32 block sums on triton: the tolerance of assert_states_equal
        assert bool(((a[fin] - b[fin]).abs() <= 1e-5 * (b[fin].abs() + 1)).all()), (f, a, b)
    # the definition, on the reference
    x = torch.cat(batches)
    v = x.transpose(0, 1).reshape(4, -1).double()
    for c in range(4):
        vals = v[c][~v[c].isnan()]
        if vals.numel() == 0:
            continue
        has_pos, has_neg = bool((vals == math.inf).any()), bool((vals == -math.inf).any())
        if has_pos or has_neg:
            expect = math.nan if has_pos and has_neg else (math.inf if has_pos else -math.inf)
            assert (math.isnan(want.mean[c]) and math.isnan(expect)) or float(want.mean[c]) == expect
            assert math.isnan(want.m2[c])
        else:
            torch.testing.assert_close(want.mean[c], vals.mean(), rtol=1e-12, atol=1e-12)
        assert float(want.maximum[c]) == float(vals.max()) and float(want.minimum[c]) == float(vals.min())
        assert int(want.hist[c, -1]) >= int((vals == math.inf).sum())
        assert int(want.hist[c, 0]) >= int((vals == -math.inf).sum())
    if case in ("+inf", "all-inf"):
        assert float(want.topk_values[3, 0]) == math.inf


@pytest.mark.parametrize("body", FAST)
def test_nonfinite_merge_and_threshold(body):
    """Shards with ±inf merge into one pass, and the exact threshold equals torch.nanquantile."""
    a_x, b_x = _nonfinite_batches("both")
    m = cs.quantile_capacity(0.1, 24)
    whole = run_batches(body, make_state(4, topk=4, m=m), [a_x, b_x])
    a = run_batches(body, make_state(4, topk=4, m=m), [a_x])
    b = make_state(4, topk=4, m=m)
    cs.channel_stats_update(b, b_x, 4, backend=body)
    merged = cs.merge_states(a, b)
    for f in EXACT_FIELDS:
        assert torch.equal(getattr(merged, f), getattr(whole, f)), f
    assert torch.equal(merged.mean.isnan(), whole.mean.isnan()) and torch.equal(merged.m2.isnan(), whole.m2.isnan())
    got, exact = cs.quantile_threshold(merged, 0.1)
    assert bool(exact.all())
    want = torch.nanquantile(torch.cat([a_x, b_x]).transpose(0, 1).reshape(4, -1), 0.9, dim=1)
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), (got, want)


# ---------------------------------------------------------------------------------------------
# The Triton body's launch paths (under the interpreter here).


@pytest.mark.skipif("triton" not in BODIES, reason="Triton not available")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nc"])
@pytest.mark.parametrize("bins", [7, 2100, 5000])
def test_triton_many_groups_and_histogram_paths(monkeypatch, layout, bins):
    """Many sample groups per channel (merged in one device pass), both read paths, and the
    histogram counted in registers (bins + 2 <= HIST_REGISTERS) or with atomics into the
    program's own row (more bins)."""
    from pyadvk.kernels import channel_stats as tk

    monkeypatch.setattr(tk, "VALUES_PER_PROGRAM", 16)
    shape = (37, 3) if layout == "nc" else (5, 3, 4, 5)
    x = activations(shape, seed=bins, ties=True, channels_last=layout == "channels_last")
    x[1, 0] = 20.0  # overflow
    want = run_batches("torch", make_state(3, topk=6, bins=bins, m=11), [x[:2], x[2:]])
    got = run_batches("triton", make_state(3, topk=6, bins=bins, m=11), [x[:2], x[2:]])
    assert_states_equal(got, want, f"triton {layout} bins={bins}")


@pytest.mark.skipif("triton" not in BODIES, reason="Triton not available")
def test_triton_launches_under_the_activations_device_context(monkeypatch):
    """Triton launches on the current CUDA device: every launch must run inside the device
    context of the activations (a spy stands in for torch.cuda.device on the CPU path)."""
    import contextlib

    from pyadvk.kernels import _common
    from pyadvk.kernels import channel_stats as tk

    entered, launches, inside = [], [], [False]

    @contextlib.contextmanager
    def spy(t):
        entered.append(t.device)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    real = tk.wrap_triton

    class Launcher:
        def __init__(self, kernel):
            self.launcher = real(kernel)

        def __getitem__(self, grid):
            launches.append(inside[0])
            return self.launcher[grid]

    monkeypatch.setattr(_common, "on_device_of", spy)
    monkeypatch.setattr(tk, "wrap_triton", Launcher)
    x = activations((3, 2, 4, 4), seed=2)
    cs.channel_stats_update(make_state(2), x, 0, backend="triton")
    assert entered == [x.device] and launches == [True]


# ---------------------------------------------------------------------------------------------
# Exact quantile thresholds and the histogram sketch.


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("q", [0.005, 0.05, 0.3])
def test_quantile_threshold_equals_torch_quantile(body, q):
    shape = (40, 3, 5, 6) if body != "triton" else (12, 3, 5, 6)
    x = activations(shape, seed=13, nan=0.0)
    count = shape[0] * 30
    m = cs.quantile_capacity(q, count)
    state = make_state(3, m=m)
    run_batches(body, state, [x[:5], x[5:]])
    thresholds, exact = cs.quantile_threshold(state, q)
    assert bool(exact.all())
    want = torch.quantile(x.transpose(0, 1).reshape(3, -1), 1 - q, dim=1)
    assert torch.equal(thresholds, want), (thresholds, want)


def test_quantile_with_nans_equals_nanquantile():
    x = activations((30, 2, 4, 4), seed=17, nan=0.2)
    state = run_batches("cpp" if "cpp" in BODIES else "torch", make_state(2, m=cs.quantile_capacity(0.01, 480)), [x])
    got, exact = cs.quantile_threshold(state, 0.01)
    assert bool(exact.all())
    assert torch.equal(got, torch.nanquantile(x.transpose(0, 1).reshape(2, -1), 0.99, dim=1))


@pytest.mark.parametrize("seed", range(3))
def test_histogram_sketch_error_bound(seed):
    """Buffer too small (count not known in advance): the histogram estimate is within one bin
    width of torch.quantile whenever the quantile lies inside the histogram range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, 4, 3, generator=g) * (1 + torch.arange(4.0))[None, :, None] * 0.4
    bins, lo, hi = 50, -6.0, 6.0
    state = cs.ChannelStats.create(4, topk=2, bins=bins, lo=lo, hi=hi, quantile_capacity=3)
    cs.channel_stats_update(state, x, 0)
    for q in (0.005, 0.1, 0.5):
        got, exact = cs.quantile_threshold(state, q)
        assert not bool(exact.any())
        want = torch.quantile(x.transpose(0, 1).reshape(4, -1), 1 - q, dim=1)
        assert bool(((got - want).abs() <= (hi - lo) / bins).all()), (q, got, want)


def test_sketch_outside_range_is_nan():
    state = cs.ChannelStats.create(1, bins=4, lo=0.0, hi=1.0, quantile_capacity=0)
    cs.channel_stats_update(state, torch.full((10, 1), 5.0), 0)
    got, exact = cs.quantile_threshold(state, 0.1)
    assert math.isnan(float(got[0])) and not bool(exact[0])


# ---------------------------------------------------------------------------------------------
# Merging states (shards).


@pytest.mark.parametrize("body", FAST)
def test_merge_equals_one_pass(body):
    x = activations((11, 3, 3, 4), seed=19, ties=True)
    m = cs.quantile_capacity(0.05, 11 * 12)
    whole = run_batches(body, make_state(3, topk=7, m=m), [x])
    a = make_state(3, topk=7, m=m)
    cs.channel_stats_update(a, x[:6], 0, backend=body)
    b = make_state(3, topk=7, m=m)
    cs.channel_stats_update(b, x[6:], 6, backend=body)
    for merged in (cs.merge_states(a, b), cs.merge_states(b, a)):
        assert_states_equal(merged, whole, "merge")
        assert torch.equal(cs.quantile_threshold(merged, 0.05)[0], cs.quantile_threshold(whole, 0.05)[0])


def _exact_histogram(x: torch.Tensor, state: cs.ChannelStats) -> torch.Tensor:
    """What one pass would count on ``state``'s grid: every non-NaN value binned by the op."""
    v = cs.channel_view(x)
    valid = ~v.isnan()
    cols = cs.bin_columns(torch.where(valid, v, 0.0), state.lo, state.hi, state.bins)
    return torch.zeros_like(state.hist).scatter_add_(1, cols, valid.long())


def _assert_within_moved(state: cs.ChannelStats, x: torch.Tensor):
    exact = _exact_histogram(x, state)
    assert torch.equal(state.hist.sum(1), exact.sum(1))
    displaced = (state.hist - exact).abs().sum(1) // 2
    assert bool((displaced <= state.hist_moved).all()), (displaced, state.hist_moved)
    assert bool((state.hist_moved <= state.count).all())


@pytest.mark.parametrize("body", FAST)
@pytest.mark.parametrize("seed", range(3))
def test_merge_of_shards_with_their_own_ranges(body, seed):
    """Shards whose histogram ranges came from their own data (the default of NeuronStats) merge:
    everything but the histogram equals one pass; the histogram, re-binned onto the union range,
    is within the reported hist_moved of the exact histogram on that grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, 4, 5, generator=g) * torch.tensor([1.0, 3.0, 0.2])[None, :, None, None]
    x[7:] += 0.7  # the second shard sits higher: the ranges overlap partly
    halves = [(x[:7], 0), (x[7:], 7)]
    states = []
    for part, offset in halves:
        lo, hi = float(part.min()), float(part.max())
        state = cs.ChannelStats.create(3, topk=6, bins=9, lo=lo, hi=hi, quantile_capacity=40)
        states.append(cs.channel_stats_update(state, part, offset, backend=body))
    whole = cs.ChannelStats.create(3, topk=6, bins=9, lo=float(x.min()), hi=float(x.max()), quantile_capacity=40)
    cs.channel_stats_update(whole, x, 0, backend=body)
    for merged in (cs.merge_states(*states), cs.merge_states(*states[::-1])):
        assert (merged.lo, merged.hi) == (whole.lo, whole.hi)
        for f in ("count", "nan_count", "minimum", "maximum", "topk_values", "topk_sample", "topk_pos", "qbuf"):
            assert torch.equal(getattr(merged, f), getattr(whole, f)), f
        torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-9, atol=1e-9)
        _assert_within_moved(merged, x)
        assert 0 < int(merged.hist_moved.sum()) < int(merged.count.sum())
    assert int(cs.merge_states(whole, whole).hist_moved.sum()) == 0  # same range: exact


def test_rebin_bound_over_repeated_merges():
    """Four shards with four ranges merged in a chain: the bound accumulates and still holds;
    tracking goes on on the merged grid; save/load keeps it."""
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(5, 2, 6, generator=g) * (1 + i) + i for i in range(4)]
    merged = None
    for i, part in enumerate(parts):
        state = cs.ChannelStats.create(2, topk=3, bins=16, lo=-1.0 - i, hi=1.0 + 2 * i, quantile_capacity=0)
        cs.channel_stats_update(state, part, 5 * i)
        merged = state if merged is None else cs.merge_states(merged, state)
    more = torch.randn(3, 2, 6, generator=g)
    cs.channel_stats_update(merged, more, 20)
    _assert_within_moved(merged, torch.cat(parts + [more]))
    again = cs.ChannelStats.from_state_dict(merged.state_dict())
    assert torch.equal(again.hist_moved, merged.hist_moved)
    sd = merged.state_dict()
    sd["hist_moved"] = sd["hist_moved"] - 10**6
    with pytest.raises(ValueError, match=r"hist_moved must lie in \[0, count\]"):
        cs.ChannelStats.from_state_dict(sd)


def test_rebin_nested_grid_places_inner_bins_exactly():
    """Bins that fall inside one target bin move without adding to the bound."""
    state = cs.ChannelStats.create(1, bins=4, lo=0.0, hi=1.0, quantile_capacity=0)
    cs.channel_stats_update(state, torch.tensor([[0.1], [0.3], [0.6], [0.9]]), 0)
    hist, moved = cs.rebin(state, 0.0, 2.0)  # target bins of width 0.5: two source bins each
    assert hist[0].tolist() == [0, 2, 2, 0, 0, 0] and int(moved[0]) <= 4
    hist, moved = cs.rebin(state, -1.0, 3.0)  # target bin [0, 1) holds the whole source range
    assert hist[0].tolist() == [0, 0, 4, 0, 0, 0] and int(moved[0]) == 0


def test_merge_rejects_other_configuration():
    a, b = make_state(3), make_state(3, topk=4)
    with pytest.raises(ValueError, match="topk=4, but this state has topk=5"):
        cs.merge_states(a, b)
    with pytest.raises(ValueError, match="channels"):
        cs.merge_states(a, make_state(2))


# ---------------------------------------------------------------------------------------------
# opcheck and bad input.


@pytest.mark.skipif("cpp" not in BODIES, reason="C++ extension not built")
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_cpu(channels_last):
    x = activations((3, 4, 5, 6), seed=23, channels_last=channels_last)
    state = make_state(4)
    torch.library.opcheck(
        torch.ops.pyadvk.channel_stats_update_,
        (*state.tensors(), x, 2, state.lo, state.hi),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_cpp_op_checks_its_arguments():
    if "cpp" not in BODIES:
        pytest.skip("C++ extension not built")
    x = activations((3, 4), seed=1)
    state = make_state(4)
    t = list(state.tensors())
    t[2] = t[2].float()  # mean must be float64
    with pytest.raises(RuntimeError, match="mean must be Double"):
        torch.ops.pyadvk.channel_stats_update_(*t, x, 0, -1.0, 1.0)
    with pytest.raises(RuntimeError, match="finite with lo < hi"):
        torch.ops.pyadvk.channel_stats_update_(*state.tensors(), x, 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="finite with lo < hi"):
        torch.ops.pyadvk.channel_stats_update_(*state.tensors(), x, 0, -math.inf, 1.0)
    with pytest.raises(RuntimeError, match="sample_offset must be >= 0"):
        torch.ops.pyadvk.channel_stats_update_(*state.tensors(), x, -1, -1.0, 1.0)
    # a negative count (a tampered state) would make the hot loops write before the top-k buffers
    bad = make_state(4)
    bad.count[1] = -1
    before = [t.clone() for t in bad.tensors()]
    with pytest.raises(RuntimeError, match="count and nan_count must be >= 0"):
        torch.ops.pyadvk.channel_stats_update_(*bad.tensors(), x, 0, -1.0, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, bad.tensors())), "a failed update changed the state"


@pytest.mark.parametrize(
    "make, match, exc",
    [
        (lambda s: cs.channel_stats_update(s, torch.randn(4), 0), "at least 2 dim", ValueError),
        (lambda s: cs.channel_stats_update(s, torch.randn(2, 5), 0), "must have 3 channels", ValueError),
        (
            lambda s: cs.channel_stats_update(s, torch.randn(2, 3).double(), 0),
            "float32, float16 or bfloat16",
            TypeError,
        ),
        (lambda s: cs.channel_stats_update(s, torch.randn(2, 3), -1), "sample_offset must be >= 0", ValueError),
        (lambda s: cs.channel_stats_update(s, torch.randn(2, 3, 0), 0), "non-empty spatial", ValueError),
        (lambda s: cs.channel_stats_update("state", torch.randn(2, 3), 0), "state must be", TypeError),
        (lambda s: cs.channel_stats_update(s, torch.randn(2, 3, 4), 0), "1 spatial values", ValueError),
    ],
)
def test_bad_updates_leave_state_unchanged(make, match, exc):
    state = make_state(3)
    cs.channel_stats_update(state, torch.randn(2, 3), 0)
    before = state.clone()
    with pytest.raises(exc, match=match):
        make(state)
    assert_states_equal(state, before, "after a failed update")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=0), "channels must be >= 1, got 0"),
        (dict(channels=2, topk=0), "topk must be >= 1, got 0"),
        (dict(channels=2, bins=0), "bins must be >= 1, got 0"),
        (dict(channels=2, lo=1.0, hi=1.0), "lo < hi"),
        (dict(channels=2, lo=0.0, hi=math.inf), "finite"),
        (dict(channels=2, quantile_capacity=-1), "quantile_capacity must be >= 0"),
    ],
)
def test_bad_state_configuration(kwargs, match):
    channels = kwargs.pop("channels")
    with pytest.raises(ValueError, match=match):
        cs.ChannelStats.create(channels, **kwargs)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_quantile_outside_open_interval(q):
    with pytest.raises(ValueError, match="quantile"):
        cs.quantile_threshold(make_state(2), q)


@pytest.mark.skipif("cpp" not in BODIES, reason="the C++ extension is not built")
@pytest.mark.slow  # a subprocess per instruction set running the op tests: 9-30 s each
@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_cpu_instruction_set(isa):
    """The reference comparisons on each copy of the cpp loops this CPU supports, on one thread
    (one sample group per channel) and on two (several groups per channel, merged)."""
    run_on_cpu_isa(
        isa,
        __file__,
        "cpp and (matches_reference or channels_last or streaming or hypothesis or nonfinite)",
        threads=(1, 2),
    )
