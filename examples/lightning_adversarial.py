"""Adversarial training in Lightning with pyadvk: a LightningModule whose ``training_step`` is
:func:`pyadvk.integrations.lightning.adversarial_training_step` (PGD adversarial training, or the
robust additions with ``--loss robust``), and the :class:`~pyadvk.integrations.lightning.RobustAccuracy`
callback logging PGD robust accuracy every epoch (AutoAttack with ``--attack autoattack``) next to
the clean accuracy. Needs ``pip install 'pyadvk[lightning]'``.

    python examples/lightning_adversarial.py                       # digits 16×16, 3 epochs
    python examples/lightning_adversarial.py --size 8 --epochs 1 --max-train-images 128 --max-images 32
"""

from __future__ import annotations

import argparse
import functools

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from pyadvk import train
from pyadvk.data import digits
from pyadvk.integrations.lightning import RobustAccuracy, adversarial_training_step
from pyadvk.models import SmallCNN


class DigitsNet(L.LightningModule):
    """SmallCNN trained with a pyadvk loss (``loss_fn(model, images, labels)``)."""

    def __init__(self, size: int, loss_fn, lr: float = 2e-3, activation: str = "relu") -> None:
        super().__init__()
        self.net = SmallCNN(in_channels=1, input_size=size, width=16, activation=activation)
        self.loss_fn = loss_fn  # a RobustLoss is a module: its adaptive psi is in the checkpoint
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return adversarial_training_step(self, batch, self.loss_fn)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(images), labels), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=16, choices=(8, 16, 32))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--loss", default="pgd", choices=("pgd", "robust"))
    p.add_argument("--attack", default="pgd", choices=("pgd", "autoattack"), help="the callback's attack")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ budget of training and evaluation (default 0.1)")
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="validation images attacked (default all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Trains, and returns the last epoch's logged numbers (also printed)."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    train_set, val_set = digits(args.size, "train"), digits(args.size, "test")
    if args.max_train_images is not None:
        train_set = Subset(train_set, range(min(args.max_train_images, len(train_set))))
    if args.max_images is not None:
        val_set = Subset(val_set, range(min(args.max_images, len(val_set))))
    if args.loss == "robust":  # the robust additions, psi0 scaled to the input size
        loss_fn = train.RobustLoss(
            eps=args.eps, alpha=args.eps / 4, steps=5, psi0=train.scaled_psi0((1, args.size, args.size))
        )
        activation = "half_huber"
    else:
        loss_fn = functools.partial(train.pgd_adversarial_loss, eps=args.eps, alpha=args.eps / 4, steps=5)
        activation = "relu"
    module = DigitsNet(args.size, loss_fn, activation=activation)
    callback = RobustAccuracy(attack=args.attack, eps=args.eps, steps=10)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(
        module,
        DataLoader(train_set, batch_size=64, shuffle=True),
        DataLoader(val_set, batch_size=128),
    )
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(", ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())))
    return result


if __name__ == "__main__":
    main()
