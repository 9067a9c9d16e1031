"""`pyadvk stats`: JSON summary, state and top-patch PNGs; bad layer names exit 2 with the valid
names; under torchrun (2 processes, gloo) the numbers equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyadvk import models
from pyadvk.cli import main
from pyadvk.data import digits
from tests.utils import run_main


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyadvk", *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.manual_seed(1)
    model = models.build("small_cnn", num_classes=10, in_channels=1, input_size=8, width=8)
    models.save_model(model, path, "small_cnn", num_classes=10, in_channels=1, input_size=8, width=8)
    return path


ARGS = [
    "--data",
    "digits:8",
    "--layers",
    "features.1,features.8,classifier.2",
    "--num-images",
    "37",
    "--batch-size",
    "10",
    "--topk",
    "4",
    "--quantile",
    "0.01",
    "--bins",
    "16",
    "--quiet",
]


def test_stats_command_writes_summary_state_and_patches(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["stats", "--model", str(model_file), *ARGS, "--patches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "features.1: 8 channels" in printed and "classifier.2: 32 channels" in printed
    summary = json.loads((out / "stats.json").read_text())
    assert summary["samples"] == 37
    layer = summary["layers"]["features.1"]
    assert len(layer["mean"]) == 8 and len(layer["topk_indices"][0]) == 4
    assert all(0 <= i < 37 for row in layer["topk_indices"] for i in row)
    assert all(layer["threshold_exact"])
    assert layer["count"][0] == 37 * 8 * 8
    # the summary matches the activations computed directly
    model = models.load_model(model_file)
    ds = digits(8, "test")
    images = torch.stack([ds[i][0] for i in range(37)])
    acts = {}
    h = dict(model.named_modules())["features.1"].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    with torch.no_grad():
        model(images)
    h.remove()
    v = acts["a"].transpose(0, 1).reshape(8, -1)
    torch.testing.assert_close(
        torch.tensor(layer["mean"], dtype=torch.float64), v.double().mean(1), rtol=1e-5, atol=1e-6
    )
    assert layer["threshold"] == torch.quantile(v, 0.99, dim=1).tolist()
    assert layer["max"] == v.amax(1).tolist()
    # patches: of channels that fire, the most selective first (issue 15 item 8), not the first K
    expected = []
    for name in ("features.1", "features.8", "classifier.2"):
        line = next(x for x in printed.splitlines() if x.startswith(f"{name}: patches of channels"))
        channels = json.loads(line.split("channels ")[1].split(" (")[0])
        assert 1 <= len(channels) <= 2
        assert all(summary["layers"][name]["max"][c] > 0 for c in channels)
        expected += [f"{name.replace('.', '_')}_ch{c}.png" for c in channels]
    pngs = sorted(p.name for p in (out / "patches").iterdir())
    assert pngs == sorted(expected)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (out / "patches").iterdir())
    assert (out / "stats.pt").exists()


def test_stats_command_with_arch_only(tmp_path):
    out = tmp_path / "o"
    assert (
        main(
            [
                "stats",
                "--arch",
                "small_cnn",
                "--data",
                "digits:8",
                "--layers",
                "features.3",
                "--num-images",
                "12",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "stats.json").read_text())
    assert "random weights" in summary["model"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--layers", "features.99"],
            "'features.99' is not a submodule of the model; valid names: features, features.0",
        ),
        (["--layers", ","], "--layers must name at least one layer"),
        (["--layers", "features.1", "--topk", "0"], "topk must be >= 1, got 0"),
        (["--layers", "features.1", "--quantile", "1.5"], "quantile must lie in (0, 1)"),
        (["--layers", "features.1", "--histogram-range", "3"], "--histogram-range must be LO,HI"),
        (["--layers", "features.1", "--histogram-range", "3,1"], "histogram_range must be finite with lo < hi"),
        (["--layers", "features.1", "--num-images", "0"], "--num-images must be >= 1"),
    ],
)
def test_user_errors_exit_2(model_file, tmp_path, args, message, capsys):
    argv = ["stats", "--model", str(model_file), "--data", "digits:8", "--quiet", *args, "--out", str(tmp_path / "out")]
    code, err = run_main(argv, capsys)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_user_error_is_one_line_from_a_fresh_interpreter(model_file, tmp_path):
    argv = ["--model", str(model_file), "--data", "digits:8", "--layers", ",", "--out", str(tmp_path / "out")]
    result = run_cli("stats", *argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "pyadvk stats: error: --layers must name at least one layer (comma-separated)"
    ]


def test_no_model_named_exits_2(capsys):
    code, err = run_main(["stats", "--layers", "x", "--data", "digits:8"], capsys)
    assert code == 2 and "name a model" in err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stats", "--help"])
    assert exc.value.code == 0 and "usage: pyadvk stats" in capsys.readouterr().out


@pytest.mark.slow  # two torchrun workers and a one-process run: ~20 s
def test_under_torchrun_matches_one_process(model_file, tmp_path):
    """Two ranks (gloo) over an uneven split (19 + 18 images), merged on rank 0: the same JSON as
    one process, batches of 1 so the model computes identical activations."""
    args = ["stats", "--model", str(model_file), *ARGS, "--batch-size", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    one = run_cli(*args, "--out", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29547",
            "-m",
            "pyadvk",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "stats.json").read_text())
    b = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for name, la in a["layers"].items():
        lb = b["layers"][name]
        for key in (
            "count",
            "min",
            "max",
            "topk_values",
            "topk_indices",
            "topk_positions",
            "threshold",
            "histogram",
            "underflow",
            "overflow",
            "histogram_range",
        ):
            assert la[key] == lb[key], (name, key)
        # moments: float32 block sums merged in float64, so the split changes the last digits
        torch.testing.assert_close(torch.tensor(la["mean"]), torch.tensor(lb["mean"]), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(torch.tensor(la["std"]), torch.tensor(lb["std"]), rtol=1e-6, atol=1e-9)


def test_consistency_report(model_file, tmp_path, capsys):
    """--consistency EPS adds the paper-2 report, equal to pyadvk.stats.consistency on the same
    images and their PGD-10 images."""
    from torch.utils.data import DataLoader, Subset

    from pyadvk.attacks import PGD
    from pyadvk.stats import consistency

    out = tmp_path / "c"
    assert main(["stats", "--model", str(model_file), *ARGS, "--consistency", "0.1", "--out", str(out)]) == 0
    report = json.loads((out / "stats.json").read_text())["consistency"]
    assert report["eps"] == 0.1 and set(report["layers"]) == {"features.1", "features.8", "classifier.2"}
    model = models.load_model(model_file)
    real = DataLoader(Subset(digits(8, "test"), range(37)), batch_size=10)
    attack = PGD(model, eps=0.1, alpha=0.025, steps=10, random_start=False)
    adv = [(attack(x, y), y) for x, y in real]
    expected = consistency(model, "features.8", real, adv, topk=4).summary()
    got = report["layers"]["features.8"]
    for key in ("consistency_real", "consistency_adv", "adversarial_fraction", "representation_consistency"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    assert "neuron consistency real" in capsys.readouterr().out
    assert main(["stats", "--model", str(model_file), *ARGS, "--consistency", "0", "--out", str(tmp_path / "z")]) == 2
