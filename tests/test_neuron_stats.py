"""NeuronStats: hooks, results against statistics of the stored activations, resume from a state
dict, merge of shards, torch.distributed sync (gloo, 2 processes), top-patch PNGs, bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from pyadvk import distributed
from pyadvk.ops import channel_stats as cs
from pyadvk.stats import NeuronStats, plot_top_patches, receptive_field_box, select_channels

WORLD = 2
LAYERS = ["features.1", "features.3", "head"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    # quantized images: many equal activations, so top-k ties are exercised
    images = torch.round(torch.rand(n, 1, 8, 8, generator=g) * 4) / 4
    return TensorDataset(images, torch.randint(0, 5, (n,), generator=g))


def _stored_activations(model, images):
    acts = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
        for name in LAYERS
    ]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return acts


def _stats(model, **kwargs):
    kwargs.setdefault("topk", 6)
    kwargs.setdefault("quantile", 0.05)
    kwargs.setdefault("histogram_range", (-1.0, 2.0))
    kwargs.setdefault("num_samples", 23)
    return NeuronStats(model, LAYERS, **kwargs)


def assert_results_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for layer in a:
        for key, va in a[layer].items():
            vb = b[layer][key]
            if isinstance(va, torch.Tensor) and va.dtype == torch.float64:
                # moments: float32 block sums (merged in float64) depend on where batches split
                torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-9, equal_nan=True, msg=f"{layer} {key}")
            elif isinstance(va, torch.Tensor):
                assert torch.equal(va.nan_to_num(), vb.nan_to_num()), f"{layer} {key}: {va} vs {vb}"
            else:
                assert va == vb, (layer, key)


def test_results_match_stored_activations():
    model = Net().eval()
    ds = _data()
    stats = _stats(model).track(DataLoader(ds, batch_size=5), progress=False)
    acts = _stored_activations(model, ds.tensors[0])
    res = stats.results()
    for layer in LAYERS:
        a = acts[layer]
        v = a.transpose(0, 1).reshape(a.shape[1], -1)
        r = res[layer]
        torch.testing.assert_close(r["mean"], v.double().mean(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["std"], v.double().std(1, unbiased=False), rtol=1e-5, atol=1e-6)
        assert torch.equal(r["min"], v.amin(1)) and torch.equal(r["max"], v.amax(1))
        assert torch.equal(r["threshold"], torch.quantile(v, 0.95, dim=1)) and bool(r["threshold_exact"].all())
        spatial = max(1, math.prod(a.shape[2:]))
        for c in range(a.shape[1]):
            order = sorted(range(v.shape[1]), key=lambda j: (-float(v[c, j]), j))[:6]
            assert r["topk_values"][c].tolist() == [float(v[c, j]) for j in order]
            assert r["topk_indices"][c].tolist() == [j // spatial for j in order]
            assert r["topk_positions"][c].tolist() == [j % spatial for j in order]
        if a.dim() == 4:
            flat = r["topk_coords"][..., 0] * a.shape[3] + r["topk_coords"][..., 1]
            assert torch.equal(flat, r["topk_positions"])
        assert int(r["histogram"].sum() + r["underflow"].sum() + r["overflow"].sum()) == v.numel()
    assert stats.samples == 23


def test_context_manager_equals_track():
    model = Net().eval()
    ds = _data()
    tracked = _stats(model).track(DataLoader(ds, batch_size=4), progress=False)
    manual = _stats(model)
    with manual, torch.no_grad():
        for x, _ in DataLoader(ds, batch_size=4):  # the same batches: bit-identical activations
            model(x)
    model(ds.tensors[0][:2])  # hooks are gone after the block
    assert manual.samples == 23
    assert_results_equal(manual.results(), tracked.results())


def test_resume_from_state_dict(tmp_path):
    model = Net().eval()
    ds = _data()
    whole = _stats(model).track(DataLoader(ds, batch_size=5), progress=False)
    first = _stats(model).track(DataLoader(ds, batch_size=5), progress=False, max_samples=12)  # "interrupted"
    assert first.samples == 12
    first.save(tmp_path / "stats.pt")
    resumed = _stats(model)
    resumed.load(tmp_path / "stats.pt")
    assert resumed.samples == 12
    resumed.track(DataLoader(ds, batch_size=5), progress=False)
    assert resumed.samples == 23
    assert_results_equal(resumed.results(), whole.results())


def test_merge_two_halves_equals_one_pass():
    model = Net().eval()
    ds = _data()
    # batches aligned with the halves, so the model computes bit-identical activations
    whole = _stats(model).track(DataLoader(ds, batch_size=5), progress=False)
    a = _stats(model).track(DataLoader(Subset(ds, range(10)), batch_size=5), progress=False)
    b = _stats(model, sample_index=(10, 1)).track(DataLoader(Subset(ds, range(10, 23)), batch_size=5), progress=False)
    merged = a.merge(b)
    assert merged.samples == 23
    res, want = merged.results(), whole.results()
    assert_results_equal(res, want)
    # ties were exercised: equal values next to each other in some top-k
    assert any(bool((r["topk_values"][:, 1:] == r["topk_values"][:, :-1]).any()) for r in want.values())


def _assert_histogram_within_moved(r: dict, a: torch.Tensor):
    """The layer's histogram differs from the exact one of the activations ``a`` on its grid by
    at most ``histogram_moved`` values per channel."""
    lo, hi = r["histogram_range"]
    v = a.transpose(0, 1).reshape(a.shape[1], -1)
    bins = r["histogram"].shape[1]
    counted = torch.zeros(v.shape[0], bins + 2, dtype=torch.int64).scatter_add_(
        1, cs.bin_columns(v, lo, hi, bins), torch.ones_like(v, dtype=torch.int64)
    )
    got = torch.cat([r["underflow"][:, None], r["histogram"], r["overflow"][:, None]], 1)
    displaced = (got - counted).abs().sum(1) // 2
    assert bool((displaced <= r["histogram_moved"]).all()), (displaced, r["histogram_moved"])


def test_halves_tracked_with_default_settings_merge_into_one_pass(tmp_path):
    """Issue 15 item 3: two halves tracked separately with the default settings (each histogram
    range from its own first batch, no sample_index, no num_samples) merge into one pass over
    all the data: exact for everything but the histogram, and the histogram, re-binned onto the
    union range, within the reported bound of the exact histogram on that grid. The merged state
    saves, loads and keeps tracking."""
    model = Net().eval()
    ds = _data()
    whole = NeuronStats(model, LAYERS, topk=6).track(DataLoader(ds, batch_size=5), progress=False)
    a = NeuronStats(model, LAYERS, topk=6).track(DataLoader(Subset(ds, range(10)), batch_size=5), progress=False)
    b = NeuronStats(model, LAYERS, topk=6).track(DataLoader(Subset(ds, range(10, 23)), batch_size=5), progress=False)
    assert a.results()["features.1"]["histogram_range"] != b.results()["features.1"]["histogram_range"]
    # dyadic default grids nest in the merged one: only values outside a shard's range (and its
    # last bin, closed at hi, which may be an edge of the merged grid) can move
    outside = {layer: sum(s.states[layer].hist[:, [0, -2, -1]].sum(1) for s in (a, b)) for layer in LAYERS}
    merged = a.merge(b)
    assert merged.samples == 23
    res, want = merged.results(), whole.results()
    acts = _stored_activations(model, ds.tensors[0])
    histogram_keys = {"histogram", "underflow", "overflow", "histogram_range", "histogram_moved"}
    for layer in LAYERS:
        exact = {k: v for k, v in res[layer].items() if k not in histogram_keys}
        assert_results_equal({layer: exact}, {layer: {k: want[layer][k] for k in exact}})
        r = res[layer]
        _assert_histogram_within_moved(r, acts[layer])
        assert bool((r["histogram_moved"] <= outside[layer]).all()), (layer, r["histogram_moved"], outside[layer])
    assert int(sum(res[layer]["histogram_moved"].sum() for layer in LAYERS)) < 5
    assert bool(want["features.1"]["threshold_exact"].all())
    merged.save(tmp_path / "merged.pt")
    again = NeuronStats(model, LAYERS, topk=6)
    again.load(tmp_path / "merged.pt")
    assert torch.equal(again.results()["head"]["histogram_moved"], res["head"]["histogram_moved"])


def test_merge_and_load_reject_other_configurations(tmp_path):
    model = Net().eval()
    a = _stats(model)
    with pytest.raises(ValueError, match="topk=3, but this NeuronStats has topk=6"):
        a.merge(_stats(model, topk=3))
    with pytest.raises(ValueError, match="histogram_range"):
        a.load_state_dict(_stats(model, histogram_range=(0.0, 1.0)).state_dict())
    with pytest.raises(ValueError, match="not a NeuronStats state dict"):
        a.load_state_dict({"format": "other"})
    sd = a.state_dict()
    sd["world_size"] = 2
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) but this run has 1"):
        a.load_state_dict(sd)
    with pytest.raises(TypeError, match="other must be a NeuronStats"):
        a.merge(object())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            dict(layers=["features.9"]),
            ValueError,
            r"'features.9' is not a submodule of the model; valid names: features, features.0",
        ),
        (dict(layers=[]), ValueError, "at least one"),
        (dict(layers=["head", "head"]), ValueError, "must not repeat"),
        (dict(topk=0), ValueError, "topk must be >= 1, got 0"),
        (dict(quantile=1.0), ValueError, r"quantile must lie in \(0, 1\)"),
        (dict(quantile=0.0), ValueError, r"quantile must lie in \(0, 1\)"),
        (dict(histogram_bins=0), ValueError, "histogram_bins must be >= 1"),
        (dict(histogram_range=(1.0, 0.0)), ValueError, "histogram_range must be finite with lo < hi"),
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(sample_index=(0, 0)), ValueError, "sample_index step must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    kwargs.setdefault("layers", LAYERS)
    with pytest.raises(exc, match=match):
        NeuronStats(Net(), **kwargs)


def test_layer_without_channel_dim_is_refused_and_nothing_is_lost():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0))
    stats = NeuronStats(model, ["0"], topk=2, histogram_range=(-3.0, 3.0))
    with stats, torch.no_grad():
        model(torch.randn(2, 4))
    before = stats.states["0"].clone()
    with pytest.raises(ValueError, match=r"at least 2 dims \(N, C, ...\), got shape \(6,\)"):
        stats.update("0", torch.randn(6))
    assert torch.equal(stats.states["0"].count, before.count) and stats.samples == 2


def test_auto_histogram_range_and_json(tmp_path):
    model = Net().eval()
    stats = NeuronStats(model, ["features.1"], topk=3).track(DataLoader(_data(), batch_size=8), progress=False)
    r = stats.results()["features.1"]
    lo, hi = r["histogram_range"]
    assert lo < hi
    stats.save_json(tmp_path / "s.json")
    import json

    data = json.loads((tmp_path / "s.json").read_text())
    assert data["layers"]["features.1"]["topk_indices"][0][0] >= 0
    # without num_samples the buffer is bounded and thresholds may come from the histogram
    assert stats.states["features.1"].quantile_capacity == 4096


def test_plot_top_patches_writes_pngs(tmp_path):
    model = Net().eval()
    ds = _data()
    stats = _stats(model).track(DataLoader(ds, batch_size=8), progress=False)
    paths = plot_top_patches(stats, ds, "features.3", [0, 2], tmp_path, receptive_field=5)
    assert len(paths) == 2
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(paths[0]).size[0] > 50
    with pytest.raises(ValueError, match="not a channel of layer"):
        plot_top_patches(stats, ds, "features.3", [7], tmp_path)
    with pytest.raises(ValueError, match="has no statistics"):
        plot_top_patches(stats, ds, "nope", [0], tmp_path)


def test_select_channels_skips_dead_ones_and_ranks_by_selectivity():
    """Issue 15 item 8: channels that never fire (max <= 0, or constant) are skipped; the others
    come most selective first (top activations farthest above the mean, in stds)."""
    model = nn.Sequential(nn.Conv2d(1, 5, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0]))
        model[0].weight[0, 0] = 1.0  # follows the image: fires, spread out
        model[0].weight[2, 0] = -1.0  # never positive: dead
        model[0].weight[4, 0] = 1.0
    images = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    images[3, 0, 1, 2] = 5.0  # one strong response: channels 0 and 4 see it, 4 also gets a bias below
    with torch.no_grad():
        model[0].bias[4] = 0.05
        model[0].weight[4, 0] = 2.0
    stats = NeuronStats(model, ["0"], topk=2).track(DataLoader(TensorDataset(images), batch_size=3), progress=False)
    chosen = select_channels(stats, "0", 5)
    assert set(chosen) == {0, 4}  # 1 and 3 are constant (0, -1), 2 never fires
    r = stats.results()["0"]
    score = [(float(r["topk_values"][c].double().mean()) - float(r["mean"][c])) / float(r["std"][c]) for c in chosen]
    assert score == sorted(score, reverse=True)
    assert select_channels(stats, "0", 1) == chosen[:1]
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_channels(stats, "0", 0)


def test_receptive_field_box_from_the_gradient():
    """A 3x3 conv (padding 1) then a 3x3 conv of stride 2: output (i, j) reads input rows and
    columns 2i - 1 .. 2i + 3 (clipped to the image)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, stride=2))
    with torch.no_grad():
        for m in model:
            m.weight.fill_(1.0)
    image = torch.rand(1, 9, 9)
    assert receptive_field_box(model, "1", image, 0, [0, 0]) == (0, 0, 4, 4)
    assert receptive_field_box(model, "1", image, 0, [2, 1]) == (3, 1, 8, 6)
    assert receptive_field_box(model, "0", image, 1, [4, 4]) == (3, 3, 6, 6)
    assert receptive_field_box(nn.Sequential(nn.Flatten(), nn.Linear(81, 3)), "1", image, 0, []) is None
    model.train()  # the model's mode is restored
    receptive_field_box(model, "1", image, 0, [0, 0])
    assert model.training and all(p.grad is None for p in model.parameters())


def test_plot_patches_cropped_to_receptive_field(tmp_path):
    model = Net().eval()
    ds = _data()
    stats = _stats(model).track(DataLoader(ds, batch_size=8), progress=False)
    channels = select_channels(stats, "features.3", 2)
    paths = plot_top_patches(stats, ds, "features.3", channels, tmp_path, model=model)
    assert [os.path.basename(p) for p in paths] == [f"features_3_ch{c}.png" for c in channels]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# torch.distributed: 2 processes (gloo) on an uneven split equal one process.


def _worker(rank, tmp, defaults):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = Net().eval()
        # 12 + 11 samples; batches of 1, so the model's activations are bit-identical to one process's
        loader = distributed.shard_loader(_data(), batch_size=1)
        stats = (NeuronStats(model, LAYERS, topk=6) if defaults else _stats(model)).track(loader, progress=False)
        assert stats.sample_index == (rank, WORLD)
        stats.sync()
        if rank == 0:
            torch.save(stats.results(), f"{tmp}/results.pt")
            torch.save(stats.samples, f"{tmp}/samples.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("defaults", [False, True], ids=["fixed-range", "defaults"])
@pytest.mark.slow
def test_sync_across_ranks_equals_one_process(tmp_path, defaults):
    """With a given histogram range: identical to one process. With the default settings (each
    rank's range from its own first batch): identical but for the histogram, which is within
    its reported bound of the exact one on the merged grid."""
    mp.spawn(_worker, args=(str(tmp_path), defaults), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "results.pt", weights_only=False)
    assert torch.load(tmp_path / "samples.pt") == 23
    model = Net().eval()
    if not defaults:
        want = _stats(model).track(DataLoader(_data(), batch_size=1), progress=False).results()
        assert_results_equal(got, want)
        return
    want = NeuronStats(model, LAYERS, topk=6).track(DataLoader(_data(), batch_size=1), progress=False).results()
    acts = _stored_activations(model, _data().tensors[0])
    histogram_keys = {"histogram", "underflow", "overflow", "histogram_range", "histogram_moved"}
    for layer in LAYERS:
        exact = {k: v for k, v in got[layer].items() if k not in histogram_keys}
        assert_results_equal({layer: exact}, {layer: {k: want[layer][k] for k in exact}})
        _assert_histogram_within_moved(got[layer], acts[layer])
