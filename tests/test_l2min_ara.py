"""The minimal-perturbation attack, the ARA metric, robustness curves and explanations."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from pyadvk import explain, metrics
from pyadvk.attacks import L2Min
from pyadvk.metrics.ara import ara_histogram, reference_indices


def linear_model(dim=12, classes=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dim, classes))
    return model.eval()


def test_l2min_finds_the_distance_to_a_linear_boundary():
    """For logits Wx + b with 2 classes the smallest L2 perturbation that flips the decision is
    |m| / ‖w₀ − w₁‖ with m the logit margin; the attack must land within 2% of it (no box)."""
    model = linear_model()
    x = torch.rand(16, 1, 3, 4) * 0.2 + 0.4
    with torch.no_grad():
        logits = model(x)
        labels = logits.argmax(1)
    w, b = model[1].weight, model[1].bias
    margin = (logits[:, 0] - logits[:, 1]).abs()
    exact_rms = margin / (w[0] - w[1]).norm() / math.sqrt(12)
    res = L2Min(model, steps=300, budget=2.0, lower=-10, upper=10)(x, labels)
    assert res.broken.all()
    torch.testing.assert_close(res.distances, exact_rms, rtol=0.02, atol=1e-4)
    assert (model(res.images).argmax(1) != labels).all()
    del b


def test_l2min_btr_and_already_wrong_samples():
    model = linear_model(classes=3, seed=1)
    x = torch.rand(10, 1, 3, 4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = pred.clone()
    labels[:3] = (pred[:3] + 1) % 3  # already misclassified: distance 0, image unchanged
    res = L2Min(model, steps=200, budget=3.0, lower=-10, upper=10)(x, labels)
    assert torch.equal(res.distances[:3], torch.zeros(3))
    assert torch.equal(res.images[:3], x[:3])
    btr = L2Min(model, steps=200, budget=3.0, criterion="btr", lower=-10, upper=10)(x, pred)
    probs = model(btr.images).softmax(1).gather(1, pred[:, None])[:, 0]
    assert (probs <= 1 / 3 + 1e-6).all()


def test_l2min_reports_unbroken_samples():
    model = linear_model()
    x = torch.rand(4, 1, 3, 4)
    labels = model(x).argmax(1)
    res = L2Min(model, steps=5, budget=1e-4)(x, labels)  # far too small a budget
    assert res.unbroken == 4 and torch.isinf(res.distances).all()
    assert torch.equal(res.images, x)


def test_l2min_step_sizes_sum_to_the_budget():
    sizes = L2Min(linear_model(), steps=450, budget=20.0).step_sizes()
    assert sizes.shape == (450,) and (sizes[1:] < sizes[:-1]).all()
    assert abs(float(sizes.double().sum()) - 20.0) < 1e-4


def test_ara_is_the_exact_area():
    d = torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)
    # C = 2: Acc = 3/4 on [0, 0.1) -> (3/4 - 1/2) * 0.1; Acc <= 1/2 afterwards.
    assert metrics.ara_from_distances(d, 2) == pytest.approx(0.025, abs=1e-12)
    # C = 10: sum over intervals of (Acc - 0.1).
    assert metrics.ara_from_distances(d, 10) == pytest.approx(0.1 * 0.65 + 0.1 * 0.4 + 0.1 * 0.15, abs=1e-12)
    # Agrees with a fine Riemann sum on random distances, ties and zeros included.
    g = torch.Generator().manual_seed(0)
    r = torch.cat([torch.zeros(20), torch.rand(200, generator=g).round(decimals=2)])
    eps = torch.linspace(0, float(r.max()), 200001)
    acc = (r[None] > eps[:, None]).double().mean(1)
    riemann = float(((acc - 0.1).clamp_min(0)[:-1] * (eps[1] - eps[0])).sum())
    assert metrics.ara_from_distances(r, 10) == pytest.approx(riemann, abs=2e-5)
    # Unbroken images count as robust up to the largest distance found.
    assert metrics.ara_from_distances(torch.tensor([0.2, math.inf]), 2) == pytest.approx(0.1)
    assert metrics.ara_from_distances(torch.tensor([0.0, 0.0]), 10) == 0.0


@pytest.mark.parametrize("attack", ["l2min", "best"])
def test_ara_end_to_end_and_plot(tmp_path, attack):
    if attack == "best":
        pytest.importorskip("pyadvk.attacks.fab")
    model = linear_model(classes=2)
    x = torch.rand(30, 1, 3, 4)
    labels = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, labels), batch_size=7)
    result = metrics.ara(model, loader, n=20, steps=100, budget=2.0, progress=False, attack=attack)
    assert result.distances.shape == (20,) and result.unbroken == 0
    assert result.unperturbed_accuracy == 1.0
    assert result.ara == pytest.approx(metrics.ara_from_distances(result.distances, 2))
    assert result.ara > 0
    result.plot(str(tmp_path / "ara.png"))
    assert (tmp_path / "ara.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["ara.png"]  # no temporary file left behind


def test_ara_reads_an_iterable_dataset_to_its_end():
    # an IterableDataset's loader has a sampler without len(): the progress bar has no total then
    # (it raised "object of type '_InfiniteConstantSampler' has no len()")
    model = linear_model(classes=2)
    x = torch.rand(9, 1, 3, 4, generator=torch.Generator().manual_seed(1))
    labels = model(x).argmax(1)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, labels))

    settings = dict(n=None, steps=20, budget=2.0, progress=False, attack="l2min")
    streamed = metrics.ara(model, DataLoader(Stream(), batch_size=4), **settings)
    mapped = metrics.ara(model, DataLoader(TensorDataset(x, labels), batch_size=4), **settings)
    assert streamed.distances.shape == (9,)
    assert torch.equal(streamed.distances, mapped.distances) and streamed.ara == mapped.ara


def test_robust_accuracy_and_curve(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(40, 1, 3, 4)
    labels = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, labels), batch_size=16)
    assert metrics.robust_accuracy(model, loader, None, progress=False) == 1.0
    curve = metrics.robustness_curve(model, loader, [0.0, 0.05, 0.3], progress=False)
    assert curve.accuracy[0] == 1.0
    assert curve.accuracy[0] >= curve.accuracy[1] >= curve.accuracy[2]
    curve.plot(str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_adversarial_explanation_moves_toward_each_target(tmp_path):
    model = linear_model(classes=3, seed=2)
    x = torch.rand(2, 1, 3, 4)
    e = explain.adversarial_explanation(model, x, rho=0.5, steps=40, lower=-5, upper=5)
    assert e.targets.shape == (2, 3) and e.adversarial.shape == (2, 3, 1, 3, 4)
    assert torch.equal(e.targets[:, 0], model(x).argmax(1))  # default order: prediction first
    p_before = model(x).softmax(1).gather(1, e.targets)
    assert (e.target_probabilities > p_before - 1e-6).all()
    # The walk ends near the radius rho (it oscillates around it with shrinking steps).
    size = e.delta.flatten(2).pow(2).mean(-1).sqrt()
    assert (size < 0.5 * 1.1).all()
    explain.save_explanation_grid(str(tmp_path / "grid.png"), e, ["a", "b", "c"])
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    s = explain.saliency(model, x)
    assert s.shape == x.shape and (s >= 0).all()
    with pytest.raises(ValueError, match=r"targets must be classes in \[0, 3\)"):
        explain.adversarial_explanation(model, x, [5])
    with pytest.raises(ValueError, match="rho must be > 0.0"):
        explain.adversarial_explanation(model, x, rho=0)


def reference_walk(model, x0, labels, steps, budget, momentum, btr=False):
    """A direct transcription of the reference procedure: N + 1 evaluations of x0 + δ (no clip);
    direction ∇CE while not broken, −δ once broken, scaled by 1 / (1e-8 + rms); momentum
    m = μ m + (1 − μ) d taken as the step, not renormalised; δ += S (N − k) / (N (N + 1) / 2) · m;
    the smallest successful δ by mean(δ²) kept."""
    delta = torch.zeros_like(x0)
    mom = torch.zeros_like(x0)
    best = torch.zeros_like(x0)
    best_sq = torch.full((x0.shape[0],), 1e30)
    dims = tuple(range(1, x0.dim()))
    for step in range(steps + 1):
        d = delta.clone().requires_grad_()
        out = model(x0 + d)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, labels, reduction="none").sum(), d)
        if btr:
            follow = (out.softmax(1).gather(1, labels[:, None])[:, 0] > 1 / out.shape[1]).float()
        else:
            follow = (out.argmax(1) == labels).float()
        sq = delta.pow(2).mean(dims)
        take = (follow == 0) & (sq < best_sq)
        best[take] = delta[take]
        best_sq[take] = sq[take]
        if step == steps:
            break
        f = follow.view(-1, 1, 1, 1)
        sdir = f * g + (1 - f) * -delta
        sdir /= 1e-8 + sdir.pow(2).mean(dims).sqrt().view(-1, 1, 1, 1)
        mom.mul_(momentum).add_(sdir, alpha=1 - momentum)
        delta.add_(mom, alpha=budget * (steps - step) / (steps * (steps + 1) / 2))
    return x0 + best


def small_cnn(seed=0, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, classes)).eval()


@pytest.mark.parametrize("criterion", ["misclassify", "btr"])
def test_l2min_reference_procedure_matches_a_transcription(criterion):
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(9, 1, 5, 5, generator=g)
    labels = model(x).argmax(1)
    labels[:2] = (labels[:2] + 1) % 4  # two already wrong: distance 0
    res = L2Min(model, steps=40, budget=6.0, criterion=criterion, procedure="reference")(x, labels)
    expected = reference_walk(model, x, labels, 40, 6.0, 0.9, btr=criterion == "btr")
    assert res.broken.all() and not res.late.any()
    assert torch.equal(res.images, expected)
    assert torch.equal(res.distances, (expected - x).pow(2).mean((1, 2, 3)).sqrt())
    if criterion == "misclassify":
        assert torch.equal(res.distances[:2], torch.zeros(2))
        assert torch.equal(res.first_broken[:2], torch.zeros(2, dtype=torch.int64))


def test_l2min_reference_differs_from_pyadvk_no_box_and_unnormalised_momentum():
    """The reference leaves the box; pyadvk's default stays in it and is a different walk."""
    model = small_cnn(seed=3)
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    x[:, :, :2] = 1.0  # pixels at the box edge: the gradient pushes some of them out
    labels = model(x).argmax(1)
    ref = L2Min(model, steps=30, budget=8.0, procedure="reference")(x, labels)
    ours = L2Min(model, steps=30, budget=8.0)(x, labels)
    assert ref.broken.all() and ours.broken.all()
    assert (ref.images > 1.0).any()
    assert (ours.images <= 1.0).all() and (ours.images >= 0.0).all()
    assert not torch.equal(ref.distances, ours.distances)


def test_l2min_reference_reports_late_images_instead_of_failing():
    model = linear_model(classes=3, seed=4)
    x = torch.rand(5, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    labels = model(x).argmax(1)
    with pytest.warns(UserWarning, match=r"5 of 5 images broke after the first half of the 6 steps or never"):
        res = L2Min(model, steps=6, budget=1e-3, procedure="reference")(x, labels)
    assert res.late.all() and res.unbroken == 5 and torch.isinf(res.distances).all()
    assert torch.equal(res.first_broken, torch.full((5,), -1)) and torch.equal(res.images, x)
    # a budget that breaks every image early: no warning, first_broken within the first half
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = L2Min(model, steps=40, budget=20.0, procedure="reference")(x, labels)
    assert res.broken.all() and (res.first_broken <= 20).all() and not res.late.any()


def test_l2min_default_procedure_records_first_broken_and_rejects_bad_procedure():
    model = linear_model(classes=3, seed=4)
    x = torch.rand(5, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    labels = model(x).argmax(1)
    res = L2Min(model, steps=40, budget=20.0, lower=-10, upper=10)(x, labels)
    assert res.broken.all() and (res.first_broken >= 1).all() and (res.first_broken <= 40).all()
    assert res.steps == 40
    with pytest.raises(ValueError, match="procedure must be one of 'pyadvk', 'reference'; got 'paper'"):
        L2Min(model, procedure="paper")


def test_reference_permutation_and_histogram_area():
    # the reference seeds the global generator with 1776 and permutes the test set
    with torch.random.fork_rng():
        torch.manual_seed(1776)
        expected = torch.randperm(50)
    state = torch.get_rng_state()
    assert torch.equal(reference_indices(50, 7), expected[:7])
    assert torch.equal(torch.get_rng_state(), state)  # global random state untouched
    assert torch.equal(
        reference_indices(50, None, seed=3), torch.randperm(50, generator=torch.Generator().manual_seed(3))
    )
    # histogram sum: from below, to the exact area as the bins get finer
    r = torch.rand(300, generator=torch.Generator().manual_seed(0)) * 0.1
    exact = metrics.ara_from_distances(r, 10)
    coarse, fine = ara_histogram(r, 10), ara_histogram(r, 10, bins=100000)
    assert coarse <= exact + 1e-7 and exact - coarse < 0.1 / 1000
    assert fine == pytest.approx(exact, rel=1e-3)
    with pytest.raises(ValueError, match="ara_histogram needs finite distances"):
        ara_histogram(torch.tensor([0.1, math.inf]), 10)


def test_ara_reference_uses_the_seeded_permutation():
    model = small_cnn(seed=5, classes=3)
    x = torch.rand(40, 1, 5, 5, generator=torch.Generator().manual_seed(6))
    labels = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, labels), batch_size=16)
    result = metrics.ara(model, loader, attack="reference", n=12, steps=40, budget=6.0, seed=11, progress=False)
    idx = reference_indices(40, 12, seed=11)
    direct = L2Min(model, steps=40, budget=6.0, procedure="reference")(x[idx], labels[idx])
    torch.testing.assert_close(result.distances, direct.distances, rtol=0, atol=0)
    assert result.integral == "histogram" and result.attack == "reference" and result.late == 0
    assert result.ara == pytest.approx(ara_histogram(direct.distances, 3), abs=0)
    assert result.to_dict()["integral"] == "histogram" and result.winner is None
    with pytest.raises(ValueError, match="attack='reference' is the reference procedure; got procedure='pyadvk'"):
        metrics.ara(model, loader, attack="reference", procedure="pyadvk")
    with pytest.raises(ValueError, match="attack must be one of 'best', 'reference', 'l2min'; got 'fab'"):
        metrics.ara(model, loader, attack="fab")


def test_l2min_input_check_is_the_attacks_one():
    """Images outside the box, out-of-range labels (IndexError before), int32 labels (refused
    before) get the check every attack shares."""
    model = linear_model(classes=3, seed=4)
    x = torch.rand(4, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    labels = model(x).argmax(1)
    attack = L2Min(model, steps=5, budget=2.0)
    with pytest.raises(ValueError, match=r"images must lie in \[lower, upper\] = \[0.0, 1.0\]"):
        attack(x + 1.0, labels)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\).*got values in \[\d, 3\]"):
        attack(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        L2Min(model, steps=5, procedure="reference")(x, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        attack(x, labels.float())
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        attack(x, labels[:3])
    expected = attack(x, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(attack(x, labels.to(dtype)).distances, expected.distances)


def test_l2min_on_step_and_ara_progress_per_step(capsys, monkeypatch):
    # every update drawn: tqdm skips redraws within 0.1 s, and this tiny run takes less than that
    import functools
    import sys

    ara_module = sys.modules["pyadvk.metrics.ara"]  # pyadvk.metrics.ara is the function
    monkeypatch.setattr(ara_module, "tqdm", functools.partial(ara_module.tqdm, mininterval=0, miniters=1))
    model = linear_model(classes=3, seed=4)
    x = torch.rand(9, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    labels = model(x).argmax(1)
    seen = []
    L2Min(model, steps=6, budget=2.0, on_step=seen.append)(x, labels)
    assert seen == list(range(7))  # one call per model evaluation, 0..N
    with pytest.raises(TypeError, match="on_step must be callable"):
        L2Min(model, on_step=3)
    loader = DataLoader(TensorDataset(x, labels), batch_size=5)
    metrics.ara(model, loader, n=None, steps=6, budget=2.0, fab_steps=2, attack="best", progress=True)
    err = capsys.readouterr().err
    # the per-step bar of each batch moves through L2Min's 7 evaluations, then counts FAB's passes
    assert "L2Min (5 images)" in err and "L2Min (4 images)" in err and "7/7" in err
    assert "FAB (5 images, model passes)" in err
    # the image bar's final line is kept (not cleared)
    last = err.rstrip().splitlines()[-1].split("\r")[-1]
    assert "misclassify-ARA (best): 100%" in last and "9/9" in last


def test_robustness_curve_generator_repeats():
    model = linear_model(classes=3, seed=4)
    x = torch.rand(64, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, model(x).argmax(1)), batch_size=16)
    kw = dict(eps_list=[0.3, 0.5], steps=1, step_ratio=0.5, progress=False)
    curves = [
        metrics.robustness_curve(model, loader, generator=torch.Generator().manual_seed(s), **kw).accuracy
        for s in (5, 5, 6, 7)
    ]
    assert curves[0] == curves[1]
    assert curves[0] != curves[2] or curves[0] != curves[3]  # the random start matters: the seed is used
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        metrics.robustness_curve(model, loader, generator=5, **kw)
