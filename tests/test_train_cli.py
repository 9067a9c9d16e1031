"""`pyadvk train`'s choices: the budget per dataset, psi0 scaled to the input size, the reference
recipe (issue 15, item 8; issue 12). Built from parsed arguments, no training."""

from __future__ import annotations

import functools

import pytest

from pyadvk import models, train
from pyadvk.cli import build_parser
from pyadvk.cli import train as train_cli
from pyadvk.cli.common import UserError


def parse(*argv: str):
    return build_parser().parse_args(["train", "--out", "unused", *argv])


@pytest.mark.parametrize(
    "argv, eps",
    [
        (["--data", "digits"], 0.1),
        (["--data", "digits:8"], 0.1),
        (["--data", "cifar10:/x"], 8 / 255),
        (["--data", "folder:/x", "--eps", "4/255"], 4 / 255),
        (["--data", "digits", "--eps", "0.3"], 0.3),
        (["--data", "digits", "--recipe", "reference"], 0.01),
        (["--data", "digits", "--recipe", "reference", "--loss", "robust"], 0.1),
    ],
)
def test_training_eps_defaults(argv, eps):
    assert train_cli.training_eps(parse(*argv)) == pytest.approx(eps)


def test_training_eps_errors():
    with pytest.raises(UserError, match="--eps: no default budget for --data 'folder:/x'"):
        train_cli.training_eps(parse("--data", "folder:/x"))
    with pytest.raises(UserError, match="--eps must be > 0 and finite, got '-1'"):
        train_cli.training_eps(parse("--eps", "-1"))


def test_psi0_default_is_scaled_and_flag_wins():
    model = models.build("small_cnn", in_channels=1, input_size=8)
    loss = train_cli.make_loss(parse("--data", "digits:8", "--loss", "robust"), model, (1, 8, 8))
    assert isinstance(loss, train.RobustLoss) and loss.psi.psi0 == pytest.approx(220 * 64 / 3072)
    loss = train_cli.make_loss(parse("--loss", "robust", "--psi0", "220"), model, (1, 8, 8))
    assert loss.psi.psi0 == 220.0
    with pytest.raises(UserError, match="--psi0 must be > 0 and finite, got 0.0"):
        train_cli.make_loss(parse("--loss", "robust", "--psi0", "0"), model, (1, 8, 8))
    settings = train_cli.run_settings(parse("--data", "digits:8", "--loss", "robust"), (1, 8, 8))
    assert settings["psi0"] == pytest.approx(220 * 64 / 3072) and settings["eps"] == 0.1


def test_reference_recipe():
    model = models.build("small_cnn", in_channels=1, input_size=8)
    loss = train_cli.make_loss(parse("--loss", "robust", "--recipe", "reference"), model, (1, 8, 8))
    assert isinstance(loss, train.RobustLoss) and loss.attack == "reference" and loss.eps == 0.1
    loss = train_cli.make_loss(parse("--loss", "pgd", "--recipe", "reference"), model, (1, 8, 8))
    assert isinstance(loss, functools.partial) and loss.func is train.reference_adversarial_loss
    assert loss.keywords == {"eps": 0.01, "steps": 7}
    assert train_cli.run_settings(parse("--recipe", "reference"), (1, 8, 8))["recipe"] == "reference"
    assert "recipe" not in train_cli.run_settings(parse(), (1, 8, 8))  # old checkpoints still resume
    with pytest.raises(UserError, match="--recipe reference applies to --loss pgd or robust .* got --loss fast"):
        train_cli.make_loss(parse("--loss", "fast", "--recipe", "reference"), model, (1, 8, 8))
