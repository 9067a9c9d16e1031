"""`pyadvk eval`: writes evaluation.json and evaluation.md, reads fractions, and refuses bad input in
one line with exit code 2 before doing any work."""

from __future__ import annotations

import json

import pytest
import torch

from pyadvk import models
from pyadvk.cli import main
from pyadvk.cli.common import UserError, parse_budget


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny SmallCNN for the 8×8 digits with random weights (saved as pyadvk train saves)."""
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "num_classes": 10, "input_size": 8, "width": 4}
    path = tmp_path_factory.mktemp("model") / "model.pt"
    models.save_model(models.SmallCNN(**kwargs), path, "small_cnn", **kwargs)
    return path


def _args(model_file, out, *extra):
    return [
        "eval",
        "--model",
        str(model_file),
        "--data",
        "digits:8",
        "--eps",
        "8/255",
        "--attack",
        "pgd",
        "--n",
        "12",
        "--steps",
        "3",
        "--sweep-steps",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_eval_writes_json_and_markdown(model_file, tmp_path, capsys, one_thread):
    out = tmp_path / "nested" / "eval"
    assert main(_args(model_file, out, "--seed", "3")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md"]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["eps"] == pytest.approx(8 / 255) and result["norm"] == "linf" and result["n"] == 12
    assert result["attack"] == "pgd" and [a["name"] for a in result["attacks"]] == ["PGD-3"]
    assert 0 <= result["robust_accuracy"] <= result["clean_accuracy"] <= 1
    assert {c["name"] for c in result["checks"]} == {"randomness", "black_box", "zero_gradients", "eps_sweep", "budget"}
    assert result["sweep"]["eps"] == pytest.approx([f * 8 / 255 for f in (0.25, 0.5, 1, 2, 4, 16)])
    md = (out / "evaluation.md").read_text()
    assert "Worst-case robust accuracy" in md and "PGD-3" in md
    printed = capsys.readouterr().out
    assert "worst-case robust accuracy" in printed and "wrote" in printed


def test_eval_sweep_list_and_none(model_file, tmp_path, one_thread):
    out = tmp_path / "a"
    assert main(_args(model_file, out, "--eps-sweep", "4/255,16/255", "--norm", "l2")) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["norm"] == "l2" and result["sweep"]["eps"] == pytest.approx([4 / 255, 16 / 255])
    assert main(_args(model_file, tmp_path / "b", "--eps-sweep", "none")) == 0
    checks = json.loads((tmp_path / "b" / "evaluation.json").read_text())["checks"]
    assert {c["name"]: c["status"] for c in checks}["eps_sweep"] == "skipped"


def test_parse_budget():
    assert parse_budget("--eps", "8/255") == pytest.approx(8 / 255)
    assert parse_budget("--eps", " 0.5") == 0.5
    bad_inputs = (("x", "a number or a fraction"), ("1/0", "a number or a fraction"), ("-1", "> 0"), ("inf", "> 0"))
    for bad, match in bad_inputs:
        with pytest.raises(UserError, match=match):
            parse_budget("--eps", bad)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eps", "8/x"], "--eps must be a number or a fraction like 8/255, got '8/x'"),
        (["--eps", "0"], "--eps must be > 0 and finite, got '0'"),
        (["--eps-sweep", "1,a"], "--eps-sweep must be a number or a fraction like 8/255, got 'a'"),
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--out", "FILE"], "is a file, not a folder"),
        (["--out", "FILE/sub"], "is a file, not a folder"),
        (["--model", "/nonexistent.pt"], "model file '/nonexistent.pt' does not exist"),
    ],
)
def test_user_errors_one_line_exit_2(model_file, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("not a folder")
    args = _args(model_file, tmp_path / "out")
    for flag, value in zip(extra[::2], extra[1::2]):
        value = value.replace("FILE", str(tmp_path / "file"))
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: pyadvk eval" in out and "--eps" in out and "autoattack" in out
