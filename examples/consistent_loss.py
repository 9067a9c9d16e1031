"""Consistent loss vs plain PGD adversarial training (Dong et al. 2017, paper 2) on the digits.

Trains SmallCNN twice from the same initialization and batch order on scikit-learn's digits
(8×8 by default): once with PGD adversarial training (``pgd_adversarial_loss``), once with the consistent
loss (``consistent_adversarial_loss``: CE(x) + CE(x_adv) + λ·Σ‖φ(x) − φ(x_adv)‖²/dim). Then, on
the test split with PGD images made against each model, prints per model: clean and PGD accuracy,
the representation consistency (mean cosine similarity of φ(x) and φ(x_adv)) of the chosen
layers, and the neuron consistency of paper 2 (label purity of each channel's top-K images).

    python examples/consistent_loss.py            # about 3 minutes per model on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from pyadvk.attacks import PGD
from pyadvk.data import digits
from pyadvk.models import SmallCNN
from pyadvk.stats import consistency, representation_consistency
from pyadvk.train import AdversarialTrainer, consistent_adversarial_loss, pgd_adversarial_loss


def train(loss_fn, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = SmallCNN(width=args.width, input_size=args.size)
    loader = DataLoader(
        digits(args.size, "train"),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    AdversarialTrainer(model, optimizer, loader, loss_fn=loss_fn, epochs=args.epochs, progress=False).fit()
    return model.eval()


def evaluate(model: torch.nn.Module, args) -> dict:
    images, labels = digits(args.size, "test").tensors
    attack = PGD(model, eps=args.eps, alpha=args.eps / 4, steps=10, generator=torch.Generator().manual_seed(args.seed))
    adv = attack(images, labels)
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).float().mean().item()
        robust = (model(adv).argmax(1) == labels).float().mean().item()
    row = {"clean_acc": clean, "pgd_acc": robust}
    for layer in args.layers:
        row[f"repr_consistency[{layer}]"] = representation_consistency(model, layer, images, adv)
    real = DataLoader(TensorDataset(images, labels), batch_size=128)
    fake = DataLoader(TensorDataset(adv, labels), batch_size=128)
    neurons = consistency(model, args.neuron_layer, real, fake, topk=args.topk).summary()
    row["neuron_consistency_real"] = neurons["consistency_real"]
    row["neuron_consistency_adv"] = neurons["consistency_adv"]
    row["adv_fraction_in_topk"] = neurons["adversarial_fraction"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=8, choices=(8, 16, 32), help="image side")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="PGD steps during training")
    parser.add_argument("--lam", type=float, default=100.0)
    parser.add_argument("--layers", nargs="+", default=["features.9", "classifier.2"])
    parser.add_argument("--neuron-layer", default="features.8")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    alpha = args.eps / 4
    losses = {
        "pgd_at": functools.partial(pgd_adversarial_loss, eps=args.eps, alpha=alpha, steps=args.steps),
        "consistent": consistent_adversarial_loss(args.eps, alpha, args.steps, layers=args.layers, lam=args.lam),
    }
    print(
        f"digits {args.size}x{args.size}, SmallCNN(width={args.width}), {args.epochs} epochs, L∞ eps={args.eps}, "
        f"PGD-{args.steps} training, PGD-10 evaluation, lam={args.lam}, layers={args.layers}"
    )
    for name, loss_fn in losses.items():
        start = time.perf_counter()
        model = train(loss_fn, args)
        seconds = time.perf_counter() - start
        row = evaluate(model, args)
        print(f"{name:>10}: train {seconds:.0f} s  " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
