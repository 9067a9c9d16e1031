"""The command line: train, ara, explain, their --help, and user errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pyadvk import models
from pyadvk.cli import main
from tests.utils import run_main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyadvk", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    code = main(
        [
            "train",
            "--data",
            "digits:8",
            "--loss",
            "fast",
            "--epochs",
            "2",
            "--batch-size",
            "128",
            "--lr",
            "3e-3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_train_writes_model_checkpoint_history(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint.pt", "history.json", "model.pt"]
    history = json.loads((trained / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    model = models.load_model(trained / "model.pt")
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.slow
def test_train_resumes(trained, capsys):
    assert (
        main(
            [
                "train",
                "--data",
                "digits:8",
                "--loss",
                "fast",
                "--epochs",
                "3",
                "--batch-size",
                "128",
                "--lr",
                "3e-3",
                "--out",
                str(trained),
            ]
        )
        == 0
    )
    assert "resuming from" in capsys.readouterr().out
    history = json.loads((trained / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.slow
def test_ara_command(trained, tmp_path, capsys):
    assert (
        main(
            [
                "ara",
                "--model",
                str(trained / "model.pt"),
                "--data",
                "digits:8",
                "--num-images",
                "20",
                "--steps",
                "30",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "misclassify-ARA" in out and "btr-ARA" in out
    report = json.loads((tmp_path / "ara.json").read_text())
    assert [r["criterion"] for r in report["results"]] == ["misclassify", "btr"]
    assert all(r["n"] == 20 for r in report["results"])
    assert (tmp_path / "ara.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_command(trained, tmp_path):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "explain",
                "--model",
                str(trained / "model.pt"),
                "--image",
                str(tmp_path / "in.png"),
                "--targets",
                "0,3",
                "--steps",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_explain_says_which_size_the_model_takes(trained, tmp_path, capsys):
    """A 64×64 RGB image with an 8×8 digits model: not a matmul shape error, but the --size and
    --channels that fit (issue 15, item 8)."""
    from PIL import Image

    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    argv = ["explain", "--model", str(trained / "model.pt"), "--image", str(tmp_path / "photo.png")]
    assert main([*argv, "--out", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert "does not take a 1×64×64 image" in err and "it takes 1×8×8: pass --size 8 --channels 1" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "grid.png").exists()
    argv += ["--size", "8", "--targets", "1", "--steps", "2", "--out", str(tmp_path / "grid.png")]
    assert main(argv) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_fitting_input_shapes_keeps_the_mode():
    model = models.build("small_cnn", in_channels=3, input_size=16).train()
    assert models.fitting_input_shapes(model, sizes=(8, 16, 32)) == [(3, 16, 16)]
    assert model.training
    assert models.first_layer_channels(model) == 3 and models.first_layer_channels(nn.Linear(2, 2)) is None


@pytest.mark.slow
def test_help_for_every_command():
    for command in ("info", "demo", "train", "ara", "explain", "stats", "bench"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: pyadvk" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["ara", "--model", "/nonexistent/model.pt", "--data", "digits:8"],
            "model file '/nonexistent/model.pt' does not exist",
        ),
        (
            ["ara", "--model", "MODEL", "--data", "cifar10:/nonexistent"],
            "CIFAR-10 folder '/nonexistent' does not exist",
        ),
        (["ara", "--model", "MODEL", "--data", "imagenet:/x"], "data must be 'digits'"),
        (["ara", "--model", "PICKLED", "--data", "digits:8"], "pass --trust-code"),
        (["ara", "--model", "BADOUT", "--data", "digits:8"], "is a TorchScript archive: it carries code"),
        (["ara", "--model", "BADOUT", "--trust-code", "--data", "digits:8"], "the model must return (B, C) logits"),
        (
            ["ara", "--model", "BADOUT", "--trust-pickle", "--data", "digits:8"],
            "the model must return (B, C) logits",
        ),
        (
            ["explain", "--model", "MODEL", "--image", "/nonexistent.png"],
            "image file '/nonexistent.png' does not exist",
        ),
        (
            ["train", "--data", "digits:8", "--loss", "consistent", "--consistent-layers", "nope", "--epochs", "1"],
            "--consistent-layers: no layer named nope in small_cnn; layers: features",
        ),
    ],
)
def test_user_errors_exit_2_without_traceback(trained, tmp_path, args, message, capsys):
    torch.save(nn.Flatten(), tmp_path / "pickled.pt")
    torch.jit.script(nn.Identity()).save(str(tmp_path / "badout.pt"))
    subst = {
        "MODEL": str(trained / "model.pt"),
        "PICKLED": str(tmp_path / "pickled.pt"),
        "BADOUT": str(tmp_path / "badout.pt"),
    }
    code, err = run_main([*[subst.get(a, a) for a in args], "--out", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "a failed command wrote output"


def test_a_user_error_is_one_line_from_a_fresh_interpreter(tmp_path):
    """What the user sees from ``python -m pyadvk``: exit 2, one line on stderr, no traceback."""
    result = run_cli("ara", "--model", "/nonexistent/model.pt", "--data", "digits:8", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    expected = "pyadvk ara: error: model file '/nonexistent/model.pt' does not exist"
    assert result.stderr.strip() == expected, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("robust", ["--activation", "half_huber", "--lipschitz-weight", "0.01"]),
        ("consistent", ["--consistent-layers", "classifier.2"]),
    ],
)
@pytest.mark.slow
def test_train_with_paper_losses(loss, extra, tmp_path):
    out = tmp_path / loss
    code = main(
        [
            "train",
            "--data",
            "digits:8",
            "--loss",
            loss,
            "--epochs",
            "1",
            "--batch-size",
            "256",
            "--attack-steps",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    history = json.loads((out / "history.json").read_text())["history"]
    assert np.isfinite(history[0]["train_loss"])
    if loss == "robust":  # the adaptive psi is part of the checkpoint
        assert "loss" in torch.load(out / "checkpoint.pt", weights_only=True)
