"""pyadvk.integrations.lightning: the robust-accuracy callback (also under trainer.validate's
inference mode) and the adversarial training_step helper. Skipped without Lightning."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from pyadvk import train  # noqa: E402
from pyadvk.attacks import PGD  # noqa: E402
from pyadvk.integrations.lightning import RobustAccuracy, adversarial_training_step  # noqa: E402
from pyadvk.metrics import robust_accuracy  # noqa: E402

EPS = 0.1


class Net(L.LightningModule):
    def __init__(self, loss_fn=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))
        self.loss_fn = loss_fn

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return adversarial_training_step(self, batch, self.loss_fn)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) * 3).long().clamp(0, 2)  # a learnable rule
    return DataLoader(TensorDataset(x, y), batch_size=16)


def trainer(callbacks, epochs=2):
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def pgd_reference(module, data):
    """The callback's PGD, built by hand, on the same images."""
    module.eval()
    g = torch.Generator().manual_seed(0)
    attack = PGD(module, eps=EPS, alpha=2.5 * EPS / 5, steps=5, generator=g)
    return robust_accuracy(module, data, attack, progress=False)


def test_callback_logs_every_n_epochs_and_matches_robust_accuracy():
    calls = []
    callback = RobustAccuracy(eps=EPS, steps=5, every_n_epochs=2)
    original = callback.measure
    callback.measure = lambda module, data: calls.append(1) or original(module, data)
    module = Net(functools.partial(train.pgd_adversarial_loss, eps=EPS, alpha=0.05, steps=2))
    t = trainer([callback], epochs=4)
    t.fit(module, loader(), loader(seed=1))
    assert len(calls) == 2  # after epochs 2 and 4 (not the sanity check, not epochs 1 and 3)
    logged = t.callback_metrics
    assert 0.0 <= float(logged["robust_accuracy"]) <= float(logged["clean_accuracy"]) <= 1.0
    assert float(logged["robust_accuracy"]) == pytest.approx(pgd_reference(module, loader(seed=1)))
    assert "train_loss" in logged and callback.last["epoch"] == 3.0
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback.measure(module, loader(seed=1))
    assert module.training and all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_callback_under_validate_inference_mode():
    """trainer.validate runs under torch.inference_mode: the callback still attacks."""
    module = Net()
    callback = RobustAccuracy(eps=EPS, steps=5, attack="pgd")
    results = trainer([callback]).validate(module, loader(seed=1), verbose=False)
    assert results[0]["robust_accuracy"] == pytest.approx(pgd_reference(module, loader(seed=1)))
    assert all(p.grad is None for p in module.parameters())


def test_callback_with_autoattack_and_normalize():
    module = Net()
    callback = RobustAccuracy(
        attack="autoattack", eps=EPS, n_classes=3, normalize=((0.5,), (0.25,)), max_images=16, log_clean=False
    )
    result = trainer([callback]).validate(module, loader(seed=1), verbose=False)[0]
    assert set(result) >= {"robust_accuracy"} and "clean_accuracy" not in result
    assert 0.0 <= result["robust_accuracy"] <= 1.0


def test_training_step_logs_the_loss_terms():
    module = Net(train.RobustLoss(steps=1, eps=EPS, alpha=0.05, psi0=1.0))
    t = trainer([], epochs=1)
    t.fit(module, loader())
    logged = t.callback_metrics
    assert {"train_loss", "train_ce", "train_penalty", "train_psi"} <= set(logged)
    assert float(logged["train_psi"]) >= 1.0


def test_errors():
    with pytest.raises(ValueError, match="attack must be one of"):
        RobustAccuracy(attack="fgsm")
    with pytest.raises(ValueError, match="every_n_epochs"):
        RobustAccuracy(every_n_epochs=0)
    with pytest.raises(ValueError, match="batch must be \\(images, labels, ...\\)"):
        adversarial_training_step(Net(), torch.zeros(2, 1, 6, 6))
