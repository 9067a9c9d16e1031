"""`pyadvk demo` end to end on a tiny budget: every output file and figure is there; the explanation
number the demo reports (mean reached p(target)) and the grid's colour bar."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pyadvk import explain
from pyadvk.cli import main


@pytest.mark.slow
def test_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--width",
            "4",
            "--train-steps",
            "1",
            "--eval-steps",
            "2",
            "--ara-images",
            "10",
            "--ara-steps",
            "10",
            "--explain-images",
            "1",
            "--eval-images",
            "20",
            "--reach-images",
            "10",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "ara.png",
        "explanations_pgd-at.png",
        "explanations_robust.png",
        "explanations_standard.png",
        "fused_step.json",
        "results.json",
    ]
    for png in ("ara.png", "explanations_robust.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"standard", "pgd-at", "robust"}
    for r in results["models"].values():
        assert 0 <= r["clean_accuracy"] <= 1 and 0 <= r["pgd_accuracy"] <= r["clean_accuracy"] + 1e-9
        assert r["attack_ara"] >= 0 and r["btr_ara"] >= 0 and r["lipschitz_bound"] > 0
        assert 0 <= r["autoattack_accuracy"] <= r["autoattack_clean_accuracy"] <= 1
        assert 0 <= r["pgd_accuracy_on_eval_images"] <= 1
        assert [a["name"] for a in r["evaluation"]["attacks"]] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
        assert r["evaluation"]["n"] == 20 and len(r["evaluation"]["checks"]) == 5
        assert r["evaluation_warnings"] == [c["name"] for c in r["evaluation"]["checks"] if c["status"] == "warn"]
        assert 0 <= r["mean_reached_p_target"] <= 1
    assert results["models"]["robust"]["activation"] == "half_huber"
    assert results["settings"]["ara_steps"] == 10
    steps = json.loads((out / "fused_step.json").read_text())
    assert {row["norm"] for row in steps} == {"linf", "l2"}
    assert all(row["max_abs_diff_vs_torch"] < 1e-5 for row in steps)
    table = capsys.readouterr().out
    assert "attack-ARA" in table and "robust" in table and "AutoAttack" in table and "p(t)" in table


def test_demo_defaults_use_the_full_ara_procedure():
    from pyadvk.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.ara_steps == 450 and args.rho == 0.1 and args.eval_images == 100


def _linear(weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model


def test_mean_target_probability_counts_only_the_targeted_walks():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    targets = torch.tensor([[0, 1, 2], [1, 2, 0]])
    reached = torch.tensor([[0.99, 0.4, 0.2], [0.98, 0.6, 0.8]])
    images = torch.zeros(2, 1, 2, 2)
    e = explain.Explanation(images, probs, targets, images[:, None].expand(2, 3, 1, 2, 2), reached)
    assert e.mean_target_probability() == pytest.approx((0.4 + 0.2 + 0.6 + 0.8) / 4)
    # Other labels: the walks toward class 1 of image 0 and class 2 of image 1 become the own class.
    assert e.mean_target_probability(torch.tensor([1, 2])) == pytest.approx((0.99 + 0.2 + 0.98 + 0.8) / 4)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        e.mean_target_probability(torch.tensor([0]))
    own = explain.Explanation(images, probs, targets[:, :1], images[:, None, :], reached[:, :1])
    with pytest.raises(ValueError, match="no targeted walk"):
        own.mean_target_probability()


def test_walks_reach_further_on_a_more_confident_model(tmp_path):
    """The number separates models: a linear model with larger logits (same decisions) reaches
    each target with higher probability at the same rho; the grid with its colour bar is written."""
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    x = torch.rand(5, 1, 2, 2)
    reached = [
        explain.adversarial_explanation(_linear(scale * w), x, rho=0.1).mean_target_probability() for scale in (1, 30)
    ]
    assert 0 < reached[0] < reached[1] <= 1
    e = explain.adversarial_explanation(_linear(w), x[:2], rho=0.1)
    path = tmp_path / "grid.png"
    explain.save_explanation_grid(str(path), e, ["a", "b", "c"], title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
