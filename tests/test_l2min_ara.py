"""The minimal-perturbation attack, the ARA metric, robustness curves and explanations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk import explain, metrics
from pyadvk.attacks import L2Min


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


def test_ara_end_to_end_and_plot(tmp_path):
    model = linear_model(classes=2)
    x = torch.rand(30, 1, 3, 4)
    labels = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, labels), batch_size=7)
    result = metrics.ara(model, loader, n=20, steps=100, budget=2.0, progress=False)
    assert result.distances.shape == (20,) and result.unbroken == 0
    assert result.unperturbed_accuracy == 1.0
    assert result.ara == pytest.approx(metrics.ara_from_distances(result.distances, 2))
    assert result.ara > 0
    result.plot(str(tmp_path / "ara.png"))
    assert (tmp_path / "ara.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["ara.png"]  # no temporary file left behind


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
