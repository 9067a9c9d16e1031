"""Resuming with changed hyperparameters is refused unless asked (issue 13, item 10), and
nonsensical command-line counts are usage errors (item 9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk.cli import main
from pyadvk.train import AdversarialTrainer, standard_loss


def _trainer(tmp_path, lr: float, settings: dict | None, **kwargs) -> AdversarialTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = TensorDataset(torch.rand(12, 4), torch.randint(0, 3, (12,)))
    return AdversarialTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        DataLoader(data, batch_size=4),
        loss_fn=standard_loss,
        epochs=2,
        checkpoint_dir=str(tmp_path),
        progress=False,
        settings=settings,
        **kwargs,
    )


def test_a_resume_with_other_settings_is_refused_and_can_be_overridden(tmp_path):
    first = _trainer(tmp_path, 0.1, {"lr": 0.1, "loss": "standard"}, resume=False)
    first.epochs = 1
    first.fit()
    with pytest.raises(
        ValueError, match=r"loss: 'standard' in the checkpoint, 'pgd' now; lr: 0.1 in the checkpoint, 0.5 now"
    ):
        _trainer(tmp_path, 0.5, {"lr": 0.5, "loss": "pgd"})
    same = _trainer(tmp_path, 0.1, {"lr": 0.1, "loss": "standard"})
    assert same.epoch == 1 and same.optimizer.param_groups[0]["lr"] == 0.1
    moved = _trainer(tmp_path, 0.5, {"lr": 0.5, "loss": "pgd"}, override_settings=True)
    assert moved.epoch == 1 and moved.optimizer.param_groups[0]["lr"] == 0.5
    moved.fit()
    assert moved.state_dict()["settings"] == {"lr": 0.5, "loss": "pgd"}


def test_checkpoints_without_settings_still_resume(tmp_path):
    first = _trainer(tmp_path, 0.1, None, resume=False)
    first.epochs = 1
    first.fit()
    assert _trainer(tmp_path, 0.1, {"lr": 0.1}).epoch == 1


@pytest.mark.parametrize("flag", ["--attack-steps", "--epochs"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_counts_must_be_positive(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "o"), flag, value])
    assert exc.value.code == 2
    assert f"{flag}: expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
