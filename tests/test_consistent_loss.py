"""The consistent loss of paper 2: the formula on hand-made features, one forward, gradients, the
training drop-in, that training with it raises representation consistency, and bad inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pyadvk.attacks import PGD
from pyadvk.data import digits
from pyadvk.models import SmallCNN
from pyadvk.stats import representation_consistency
from pyadvk.train import AdversarialTrainer, consistent_adversarial_loss, consistent_loss, pgd_adversarial_loss


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 2, 2, generator=gen)
    x_adv = (x + 0.2 * torch.randn(5, 3, 2, 2, generator=gen)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 3, (5,), generator=gen)


def test_formula_on_known_features(batch):
    x, x_adv, y = batch
    model = mlp()
    ce = nn.functional.cross_entropy
    plain = ce(model(x), y) + ce(model(x_adv), y)
    # layer "0" (Flatten) outputs the images themselves: the term is mean_b ‖x_b − x_adv,b‖² / 12
    term0 = ((x - x_adv).flatten(1).pow(2).sum(1) / 12).mean()
    h, h_adv = model[:3](x), model[:3](x_adv)
    term2 = ((h - h_adv).pow(2).sum(1) / 6).mean()
    torch.testing.assert_close(consistent_loss(model, x, x_adv, y, "0", lam=0.7), plain + 0.7 * term0)
    torch.testing.assert_close(consistent_loss(model, x, x_adv, y, ["0", "2"], lam=2.0), plain + 2.0 * (term0 + term2))
    torch.testing.assert_close(consistent_loss(model, x, x_adv, y, ["0", "2"], lam=0.0), plain)


def test_one_forward_of_the_concatenated_batch_and_gradients(batch):
    x, x_adv, y = batch
    model = mlp()
    sizes = []
    model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    x_adv = x_adv.clone().requires_grad_(True)
    loss = consistent_loss(model, x, x_adv, y, ["1", "3"], lam=1.0)
    assert sizes == [10]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert x_adv.grad is not None
    assert not any(m._forward_hooks for m in model.modules() if m is not model)  # hooks removed


def test_drop_in_is_pgd_then_consistent_loss(batch):
    x, _, y = batch
    model = mlp().train()
    loss_fn = consistent_adversarial_loss(0.1, 0.03, 3, layers=["2"], lam=0.5)
    torch.manual_seed(5)
    got = loss_fn(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # the attack took input-only gradients
    torch.manual_seed(5)
    adv = PGD(model, eps=0.1, alpha=0.03, steps=3)(x, y)
    torch.testing.assert_close(got, consistent_loss(model, x, adv, y, ["2"], lam=0.5))
    assert model.training
    assert "lam=0.5" in repr(loss_fn)


def test_drop_in_runs_in_the_trainer(batch):
    x, _, y = batch
    model = mlp()
    loader = [(x, y), (x.flip(0), y.flip(0))]
    trainer = AdversarialTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        loss_fn=consistent_adversarial_loss(0.1, 0.03, 2, layers="2", lam=1.0),
        epochs=1,
        progress=False,
    )
    history = trainer.fit()
    assert len(history) == 1 and history[0]["train_loss"] > 0


def _train(loss_fn, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(width=16, input_size=8)
    loader = DataLoader(digits(8, "train"), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    AdversarialTrainer(
        model, torch.optim.Adam(model.parameters(), lr=3e-3), loader, loss_fn=loss_fn, epochs=epochs, progress=False
    ).fit()
    return model.eval()


@pytest.mark.slow
def test_training_with_the_consistent_loss_raises_representation_consistency():
    # Same initialization and batch order; only the loss differs. Representation consistency is a
    # cosine close to 1 for both, so the margin is stated on the inconsistency 1 − cos.
    eps, alpha, steps, layers = 0.1, 0.025, 2, ["features.9", "classifier.2"]
    plain = _train(functools.partial(pgd_adversarial_loss, eps=eps, alpha=alpha, steps=steps), epochs=3)
    consistent = _train(consistent_adversarial_loss(eps, alpha, steps, layers=layers, lam=100.0), epochs=3)
    x, y = digits(8, "test").tensors
    x, y = x[:200], y[:200]

    def measure(model):
        adv = PGD(model, eps=eps, alpha=alpha, steps=10, generator=torch.Generator().manual_seed(0))(x, y)
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        return representation_consistency(model, "classifier.2", x, adv), accuracy

    (cons_plain, acc_plain), (cons_ours, acc_ours) = measure(plain), measure(consistent)
    assert acc_plain > 0.8 and acc_ours > 0.8, (acc_plain, acc_ours)
    assert 1 - cons_ours < 0.6 * (1 - cons_plain), (cons_plain, cons_ours)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ({"layers": "9"}, ValueError, r"layers '9' is not a layer of Sequential; valid names: 0, 1, 2, 3"),
        ({"layers": []}, ValueError, "layers must be a layer name or a non-empty list"),
        ({"layers": ["1", "1"]}, ValueError, "layers must not repeat a layer"),
        ({"lam": -1.0}, ValueError, "lam must be >= 0.0, got -1.0"),
        ({"x_adv": torch.rand(4, 3, 2, 2)}, ValueError, "x_adv must have the shape of x"),
        ({"x_adv": torch.rand(5, 3, 2, 2, dtype=torch.float64)}, TypeError, "x_adv must have the dtype of x"),
        ({"y": torch.zeros(4, dtype=torch.int64)}, ValueError, r"y must be an int64 tensor of shape \(5,\)"),
        ({"y": torch.zeros(5)}, ValueError, "y must be an int64 tensor"),
        (
            {"x": torch.rand(0, 3, 2, 2), "x_adv": torch.rand(0, 3, 2, 2), "y": torch.zeros(0, dtype=torch.int64)},
            ValueError,
            "at least one image",
        ),
    ],
)
def test_bad_arguments(args, error, match, batch):
    x, x_adv, y = batch
    kwargs = dict(model=mlp(), x=x, x_adv=x_adv, y=y, layers=["1"], lam=1.0) | args
    with pytest.raises(error, match=match):
        consistent_loss(**kwargs)


def test_reused_layer_is_rejected(batch):
    x, x_adv, y = batch

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.Flatten()
            self.act = nn.ReLU()
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.act(self.head(self.act(self.flat(x))))

    with pytest.raises(RuntimeError, match="layer 'act' ran 2 times in one forward"):
        consistent_loss(Twice(), x, x_adv, y, ["act"])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": -0.1}, ValueError, "eps must be >= 0.0, got -0.1"),
        ({"alpha": 0.0}, ValueError, "alpha must be > 0.0, got 0.0"),
        ({"steps": -2}, ValueError, "steps must be >= 0, got -2"),
        ({"norm": "l1"}, ValueError, "norm must be one of 'linf', 'l2'"),
        ({"lam": float("nan")}, ValueError, "lam must not be NaN"),
        ({"layers": ()}, ValueError, "layers must be a layer name or a non-empty list"),
    ],
)
def test_drop_in_bad_arguments(kwargs, error, match):
    args = dict(eps=0.1, alpha=0.03, steps=2, layers=["1"], lam=1.0) | kwargs
    with pytest.raises(error, match=match):
        consistent_adversarial_loss(**args)


def test_drop_in_bad_layer_on_first_call(batch):
    x, _, y = batch
    loss_fn = consistent_adversarial_loss(0.1, 0.03, 2, layers=["nope"])
    with pytest.raises(ValueError, match="layers 'nope' is not a layer"):
        loss_fn(mlp(), x, y)


def test_layer_without_one_row_per_image_is_rejected(batch):
    x, x_adv, y = batch

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            flat = x.flatten(1)
            return self.head(flat + self.feat(flat.mean(0, keepdim=True)))

    with pytest.raises(ValueError, match=r"layer 'feat' must output one row per image \(10\), got shape \(1, 12\)"):
        consistent_loss(Pooled(), x, x_adv, y, ["feat"])
