"""metrics.ara(attack="best"): the smaller of L2Min's and FAB's distance per image, on a linear
multi-class model whose smallest perturbation is known in closed form; and `pyadvk ara --attack`."""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk import metrics, models
from pyadvk.attacks import L2Min
from pyadvk.cli import main
from pyadvk.metrics.ara import ara_histogram, reference_indices

DIM = 3 * 8 * 8
ARA_MODULE = sys.modules["pyadvk.metrics.ara"]  # pyadvk.metrics.ara is also the function


def linear_five_class(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(DIM, 5)).eval()


def linear_images(n=40, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.4 + 0.3


def exact_minimal(model, x, labels):
    """Per image the smallest L2 perturbation of a linear model, min_j (z_y − z_j) / ‖w_y − w_j‖₂,
    its RMS size, and the perturbation itself (to check the box [0, 1] is never active)."""
    w, b = model[1].weight.detach(), model[1].bias.detach()
    z = x.flatten(1) @ w.T + b
    diff = w[labels][:, None, :] - w[None, :, :]  # (B, C, D): w_y − w_j
    margin = z.gather(1, labels[:, None]) - z  # (B, C)
    dist = margin / diff.norm(dim=2)
    dist.scatter_(1, labels[:, None], math.inf)
    d, j = dist.min(dim=1)
    dw = diff[torch.arange(len(x)), j]
    delta = -(d / dw.norm(dim=1))[:, None] * dw
    return d, d / math.sqrt(DIM), delta.view_as(x)


def linear_setup(n=40):
    model = linear_five_class()
    x = linear_images(n)
    with torch.no_grad():
        labels = model(x).argmax(1)
    _, exact_rms, delta = exact_minimal(model, x, labels)
    moved = x + delta
    assert moved.min() > 0.0 and moved.max() < 1.0  # the box is never active
    return model, x, labels, exact_rms, delta


@pytest.mark.slow
def test_best_reaches_the_exact_linear_distances_and_never_exceeds_l2min():
    pytest.importorskip("pyadvk.attacks.fab")
    model, x, labels, exact_rms, _ = linear_setup()
    loader = DataLoader(TensorDataset(x, labels), batch_size=16)
    best = metrics.ara(model, loader, n=None, progress=False)
    l2min = metrics.ara(model, loader, n=None, attack="l2min", progress=False)
    assert best.attack == "best" and best.unbroken == 0
    ratio = best.distances / exact_rms
    assert abs(float(ratio.median()) - 1.0) <= 0.01, ratio
    assert (ratio >= 1.0 - 1e-4).all()  # nothing is closer than the exact minimum
    exact_ara = metrics.ara_from_distances(exact_rms, 5)
    assert abs(best.ara / exact_ara - 1.0) <= 0.01, (best.ara, exact_ara)
    assert (best.distances <= l2min.distances).all()
    fab_won = torch.tensor([w == "fab" for w in best.winner])
    assert torch.equal(fab_won, best.distances < l2min.distances)
    assert sum(best.to_dict()["winner_counts"].values()) == len(x)


@dataclass
class _Found:
    images: torch.Tensor
    distances: torch.Tensor
    broken: torch.Tensor

    @property
    def rms_distances(self):
        return self.distances / math.sqrt(self.images[0].numel())


class _ExactProjection:
    """Stands in for FAB with known answers: the exact boundary point (1.0001× beyond it) for
    every image, except image 0 (claims success with the clean image: must be rejected) and
    image 2 (no success)."""

    def __init__(self, model, delta):
        self.model, self.delta = model, delta

    def minimal(self, images, labels):
        adv = images + 1.0001 * self.delta[: len(images)]
        adv[0] = images[0]
        broken = torch.ones(len(images), dtype=torch.bool)
        broken[2] = False
        return _Found(adv, (adv - images).flatten(1).norm(dim=1), broken)


def test_best_keeps_the_smaller_confirmed_distance(monkeypatch):
    model, x, labels, exact_rms, delta = linear_setup(12)
    loader = DataLoader(TensorDataset(x, labels), batch_size=12)
    monkeypatch.setattr(ARA_MODULE, "_fab", lambda model_, steps: _ExactProjection(model, delta))
    l2min = metrics.ara(model, loader, n=None, attack="l2min", steps=100, budget=2.0, progress=False)
    best = metrics.ara(model, loader, n=None, steps=100, budget=2.0, progress=False)
    fab_rms = _ExactProjection(model, delta).minimal(x, labels).rms_distances
    valid = torch.ones(12, dtype=torch.bool)
    valid[[0, 2]] = False
    fab_wins = valid & (fab_rms < l2min.distances)
    assert fab_wins.sum() >= 8  # L2Min overshoots on most images of this 5-class model
    torch.testing.assert_close(best.distances, torch.where(fab_wins, fab_rms, l2min.distances), rtol=0, atol=0)
    assert best.winner == ["fab" if f else "l2min" for f in fab_wins.tolist()]
    assert best.winner_counts == {"fab": int(fab_wins.sum()), "l2min": 12 - int(fab_wins.sum())}
    assert best.ara == metrics.ara_from_distances(best.distances, 5) and best.ara < l2min.ara
    del exact_rms


def test_best_with_btr_is_l2min_alone_and_says_so(monkeypatch):
    model, x, labels, _, _ = linear_setup(6)
    loader = DataLoader(TensorDataset(x, labels), batch_size=6)

    def no_fab(*args):
        raise AssertionError("FAB must not run for criterion='btr'")

    monkeypatch.setattr(ARA_MODULE, "_fab", no_fab)
    kw = dict(criterion="btr", n=None, steps=60, budget=2.0, progress=False)
    best, l2min = metrics.ara(model, loader, **kw), metrics.ara(model, loader, attack="l2min", **kw)
    assert torch.equal(best.distances, l2min.distances) and best.winner is None
    assert "FAB does not apply" in best.note and "FAB does not apply" in best.to_dict()["note"]


def _model_file(tmp_path):
    torch.manual_seed(0)
    model = models.SmallCNN(1, 10, 8, width=4)
    path = tmp_path / "model.pt"
    models.save_model(model, path, "small_cnn", in_channels=1, num_classes=10, input_size=8, width=4)
    return model.eval(), str(path)


def _ara_cli(path, out, attack, n=10):
    args = ["ara", "--model", path, "--data", "digits:8", "--num-images", str(n), "--steps", "30"]
    args += ["--criterion", "misclassify", "--out", str(out)]
    return main(args + ([] if attack is None else ["--attack", attack]))


@pytest.mark.slow
def test_cli_attack_l2min_and_reference(tmp_path, capsys):
    from pyadvk import data

    model, path = _model_file(tmp_path)
    assert _ara_cli(path, tmp_path / "l2", "l2min") == 0
    report = json.loads((tmp_path / "l2" / "ara.json").read_text())
    assert report["attack"] == "l2min" and report["results"][0]["attack"] == "l2min"
    assert "attack l2min" in capsys.readouterr().out
    # reference: the first 10 of the 1776-seeded permutation of the whole split
    assert _ara_cli(path, tmp_path / "ref", "reference") == 0
    result = json.loads((tmp_path / "ref" / "ara.json").read_text())["results"][0]
    assert result["attack"] == "reference" and result["n"] == 10
    dataset, _ = data.load("digits:8", "test")
    idx = reference_indices(len(dataset), 10)
    x = torch.stack([dataset[int(i)][0] for i in idx])
    y = torch.tensor([int(dataset[int(i)][1]) for i in idx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # late images are counted in the report
        direct = L2Min(model, steps=30, procedure="reference")(x, y)
    assert result["unbroken"] == direct.unbroken and result["late"] == int(direct.late.sum())
    if direct.unbroken == 0:
        assert result["integral"] == "histogram" and result["ara"] == ara_histogram(direct.distances, 10)
    assert result["median_distance"] == float(direct.distances.median())
    with pytest.raises(SystemExit):
        main(["ara", "--model", path, "--data", "digits:8", "--attack", "fab"])


@pytest.mark.slow
def test_cli_default_attack_is_best(tmp_path, capsys):
    pytest.importorskip("pyadvk.attacks.fab")
    _, path = _model_file(tmp_path)
    assert _ara_cli(path, tmp_path, None) == 0
    result = json.loads((tmp_path / "ara.json").read_text())["results"][0]
    assert result["attack"] == "best" and sum(result["winner_counts"].values()) == 10
    assert "attack best" in capsys.readouterr().out
