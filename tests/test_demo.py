"""`pyadvk demo` end to end on a tiny budget: every output file and figure is there."""

from __future__ import annotations

import json

import pytest

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
    assert results["models"]["robust"]["activation"] == "half_huber"
    steps = json.loads((out / "fused_step.json").read_text())
    assert {row["norm"] for row in steps} == {"linf", "l2"}
    assert all(row["max_abs_diff_vs_torch"] < 1e-5 for row in steps)
    table = capsys.readouterr().out
    assert "attack-ARA" in table and "robust" in table
