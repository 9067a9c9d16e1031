"""Training drop-ins and the trainer: losses, checkpoints, resume, mixed precision."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk import train
from pyadvk.attacks import PGD


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def tiny_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


LOSSES = {
    "standard": train.standard_loss,
    "pgd": functools.partial(train.pgd_adversarial_loss, eps=0.1, alpha=0.05, steps=2),
    "fast": functools.partial(train.fast_fgsm_loss, eps=0.1),
    "halfhalf": train.half_half_loss,
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_are_differentiable_and_touch_only_their_own_grads(name):
    model = tiny_model()
    x, y = tiny_data(8)
    loss = LOSSES[name](model, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters()), "the attack created parameter gradients"
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pgd_loss_is_cross_entropy_on_pgd_images():
    model = tiny_model()
    x, y = tiny_data(8)
    torch.manual_seed(3)
    loss = train.pgd_adversarial_loss(model, x, y, eps=0.1, alpha=0.05, steps=3)
    torch.manual_seed(3)
    adv = PGD(model, eps=0.1, alpha=0.05, steps=3)(x, y)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(adv), y))


def test_half_half_perturbs_exactly_a_fraction():
    x, y = tiny_data(10)
    mixed = train.half_half(x, y, lambda a, b: a + 0.5, fraction=0.3, generator=torch.Generator().manual_seed(0))
    changed = (mixed != x).flatten(1).any(1)
    assert int(changed.sum()) == 3
    with pytest.raises(ValueError, match="fraction must be in"):
        train.half_half(x, y, lambda a, b: a, fraction=1.5)


def test_fast_fgsm_stays_in_the_ball():
    model = tiny_model()
    x, y = tiny_data(8)
    seen = {}

    def spy(m, images):
        seen["x"] = images
        return m(images)

    wrapped = lambda images: spy(model, images)  # noqa: E731
    train.fast_fgsm_loss(wrapped, x, y, eps=0.1)
    assert (seen["x"] - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("name", ["standard", "pgd"])
def test_resume_gives_the_same_model_as_one_run(name, tmp_path):
    x, y = tiny_data()

    def make(epochs, ckpt):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        return train.AdversarialTrainer(
            model,
            opt,
            loader,
            loss_fn=LOSSES[name],
            epochs=epochs,
            scheduler=sched,
            checkpoint_dir=ckpt,
            progress=False,
        )

    torch.manual_seed(0)
    straight = make(3, None)
    straight.fit()
    torch.manual_seed(0)
    first = make(2, str(tmp_path))
    first.fit()
    resumed = make(3, str(tmp_path))  # a new process would do this: picks up checkpoint.pt
    assert resumed.epoch == 2
    history = resumed.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_trainer_learns_and_evaluates_with_bf16_and_channels_last():
    x, y = tiny_data(96)
    y = (x.mean((1, 2, 3)) > 0.5).long()  # a learnable rule
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = tiny_model()
    trainer = train.AdversarialTrainer(
        model,
        torch.optim.Adam(model.parameters(), 1e-2),
        loader,
        loss_fn=train.standard_loss,
        epochs=15,
        test_loader=loader,
        amp="bf16",
        channels_last=True,
        progress=False,
    )
    history = trainer.fit()
    assert history[-1]["test_accuracy"] > 0.8
    assert not model.training


def test_trainer_errors(tmp_path):
    model = tiny_model()
    loader = DataLoader(TensorDataset(*tiny_data(8)), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="amp must be one of"):
        train.AdversarialTrainer(model, opt, loader, amp="fp8")
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not load"):
        train.AdversarialTrainer(model, opt, loader, checkpoint_dir=str(tmp_path))
    bad = lambda m, a, b: torch.tensor(float("nan"), requires_grad=True)  # noqa: E731
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train.AdversarialTrainer(model, opt, loader, loss_fn=bad, epochs=1, progress=False).fit()
