"""RobustLoss (Woods et al. 2019 as one training loss): formula, state, checkpoints, DDP."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk import models, train
from pyadvk.lipschitz import AdaptivePsi, LipschitzPenalty, input_gradient_penalty
from pyadvk.nn import HalfHuberReLU
from tests.test_distributed import _spawn


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), HalfHuberReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def tiny_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_loss_is_ce_plus_psi_times_penalty_without_attack():
    model, (x, y) = tiny_model(), tiny_data()
    loss_fn = train.RobustLoss(steps=0, generator=torch.Generator().manual_seed(3))
    loss = loss_fn(model, x, y)
    # the same penalty draw, the psi after one update with this batch's cross-entropy
    pen, logits = input_gradient_penalty(model, x, y, generator=torch.Generator().manual_seed(3), return_logits=True)
    ce = nn.functional.cross_entropy(logits, y)
    psi = AdaptivePsi()
    psi.update(ce.detach())
    torch.testing.assert_close(loss, ce + psi.psi * pen, rtol=1e-6, atol=1e-6)
    assert loss_fn.last["psi"].item() == pytest.approx(psi.psi)


def test_gradients_reach_parameters_and_attack_touches_no_grad():
    model, (x, y) = tiny_model(), tiny_data()
    loss = train.RobustLoss(eps=0.1, alpha=0.05, steps=2)(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_psi_state_is_checkpointed_and_resumed(tmp_path):
    x, y = tiny_data(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def make(epochs):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loss_fn = train.RobustLoss(
            steps=1,
            eps=0.1,
            alpha=0.1,
            generator=torch.Generator().manual_seed(0),
            psi=AdaptivePsi(psi0=1.0, k=0.5, target_loss=5.0),
        )
        return train.AdversarialTrainer(
            model, opt, loader, loss_fn=loss_fn, epochs=epochs, checkpoint_dir=str(tmp_path), progress=False
        )

    first = make(1)
    first.fit()
    s_after_one = float(first.loss_fn.psi.integral)
    assert s_after_one > 0  # the loss is below the target: psi grew
    resumed = make(2)
    assert float(resumed.loss_fn.psi.integral) == s_after_one


def test_lipschitz_term_and_errors():
    model, (x, y) = tiny_model(), tiny_data()
    with_lip = train.RobustLoss(
        steps=0, lipschitz_weight=0.5, model=model, input_shape=(1, 6, 6), generator=torch.Generator().manual_seed(0)
    )
    plain = train.RobustLoss(steps=0, generator=torch.Generator().manual_seed(0))
    total, base = with_lip(model, x, y), plain(model, x, y)
    pen = LipschitzPenalty(model, (1, 6, 6))  # same seed and iterations as the one inside with_lip
    torch.testing.assert_close(total, base + 0.5 * pen(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="lipschitz_weight > 0 needs model= and input_shape="):
        train.RobustLoss(lipschitz_weight=1.0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        train.RobustLoss(steps=-1)


def test_demo_model_with_half_huber_trains():
    model = models.SmallCNN(1, 3, 8, width=4, activation="half_huber")
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    train.RobustLoss(steps=1, eps=0.1, alpha=0.1)(model, x, y).backward()


def _robust_rank(rank, tmp):
    import torch.distributed as dist

    from pyadvk import distributed

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    x, y = tiny_data(16, seed=rank)  # each rank its own shard
    loss_fn = train.RobustLoss(
        steps=1,
        eps=0.1,
        alpha=0.1,
        lipschitz_weight=0.1,
        model=model,
        input_shape=(1, 6, 6),
        generator=torch.Generator().manual_seed(rank),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = torch.stack([loss_fn.psi.integral.double(), loss_fn.last["psi"].double()])
    gathered = [torch.empty_like(state) for _ in range(2)]
    dist.all_gather(gathered, state)
    weights = torch.cat([p.detach().flatten() for p in distributed.unwrap(model).parameters()])
    wg = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(wg, weights)
    if rank == 0:
        torch.save({"psi": gathered, "weights": wg}, f"{tmp}/out.pt")


@pytest.mark.slow  # spawns two gloo ranks: ~15 s
def test_ddp_psi_and_weights_identical_on_every_rank(tmp_path):
    """Different shards per rank, yet psi (updated from the all-reduced CE) and the weights
    stay identical across ranks; the attack's input gradients do not break DDP."""
    _spawn(_robust_rank, tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["psi"][0], out["psi"][1])
    assert torch.equal(out["weights"][0], out["weights"][1])


def reference_transcription(model, x0, labels, eps, steps, l2min, affected):
    """The reference code's training attack, transcribed: zero start, no clip, no momentum;
    direction ∇CE while not done (rms(δ) < eps, or still correct for L2,min), else −δ; scaled to
    unit RMS (1e-8 + rms), times the 0/1 mask; steps eps (N − k) / (N (N + 1) / 2)."""
    delta = torch.zeros_like(x0)
    best, best_sq = torch.zeros_like(x0), torch.full((len(x0),), 1e30)
    a = affected.float().view(-1, 1, 1, 1)
    for k in range(steps + 1 if l2min else steps):
        d = delta.clone().requires_grad_()
        out = model(x0 + d)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, labels, reduction="none").sum(), d)
        if l2min:
            follow = (out.argmax(1) == labels).float()
            sq = delta.pow(2).mean((1, 2, 3))
            take = (follow == 0) & (sq < best_sq)
            best[take], best_sq[take] = delta[take], sq[take]
            if k == steps:
                return x0 + best
        else:
            follow = (delta.pow(2).mean((1, 2, 3)) < eps**2).float()
        f = follow.view(-1, 1, 1, 1)
        sdir = f * g + (1 - f) * -delta
        sdir /= 1e-8 + sdir.pow(2).mean((1, 2, 3)).sqrt().view(-1, 1, 1, 1)
        sdir *= a
        delta.add_(sdir, alpha=eps * (steps - k) / (steps * (steps + 1) / 2))
    return x0 + delta


@pytest.mark.parametrize("l2min,eps", [(False, 0.01), (True, 0.1), (True, 0.5)])
def test_reference_attack_matches_transcription(l2min, eps):
    model, (x, y) = tiny_model(), tiny_data()
    mask = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5
    adv = train.adversarial.reference_adversarial_images(model, x, y, eps=eps, steps=7, l2min=l2min, affected=mask)
    assert torch.equal(adv, reference_transcription(model, x, y, eps, 7, l2min, mask))
    assert torch.equal(adv[~mask], x[~mask])  # not attacked: delta stays 0
    if not l2min:  # the step sizes sum to eps: the walk never leaves the RMS ball
        rms = (adv - x).pow(2).mean((1, 2, 3)).sqrt()
        assert (rms[mask] > 0.5 * eps).all() and (rms <= eps * (1 + 1e-5)).all()
    else:  # the same walk as L2Min's reference procedure without momentum
        from pyadvk.attacks import L2Min

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # images broken late: the training walk does not check
            ref = L2Min(model, steps=7, budget=eps, momentum=0.0, procedure="reference")(x, y)
        assert torch.equal(adv[mask], ref.images[mask])


def test_reference_attack_runs_on_the_whole_batch():
    """With batch norm in training mode the attacked samples see the whole batch's statistics
    (the reference's whole-batch attack), unlike attacking them as a sub-batch; in eval mode the
    two agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), HalfHuberReLU(), nn.Flatten(), nn.Linear(64, 3))
    x, y = tiny_data()
    mask = torch.arange(16) % 3 == 0
    attack = train.adversarial.reference_adversarial_images
    assert not torch.allclose(attack(model, x, y, affected=mask)[mask], attack(model, x[mask], y[mask]))
    model.eval()
    torch.testing.assert_close(attack(model, x, y, affected=mask)[mask], attack(model, x[mask], y[mask]))


def test_robust_loss_reference_recipe():
    """attack="reference": a Bernoulli(0.5) mask per sample, L2,min (eps 0.1, 7 steps) on the whole
    batch, then CE + psi * penalty on the mixed batch."""
    model, (x, y) = tiny_model(), tiny_data(32)
    loss_fn = train.RobustLoss(attack="reference", generator=torch.Generator().manual_seed(5))
    assert loss_fn.eps == 0.1 and loss_fn.steps == 7
    loss = loss_fn(model, x, y)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(32, generator=g) < 0.5
    assert torch.equal(loss_fn.last["attacked"], mask) and 0 < mask.sum() < 32
    adv = reference_transcription(model, x, y, 0.1, 7, True, mask)
    pen, logits = input_gradient_penalty(model, adv, y, generator=g, return_logits=True)
    ce = nn.functional.cross_entropy(logits, y)
    psi = AdaptivePsi()
    psi.update(ce.detach())
    torch.testing.assert_close(loss, ce + psi.psi * pen, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the attack touched no parameter gradient
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_robust_loss_pyadvk_attacks_exactly_half_as_a_sub_batch():
    model, (x, y) = tiny_model(), tiny_data(15)
    loss_fn = train.RobustLoss(eps=0.1, alpha=0.05, steps=2, generator=torch.Generator().manual_seed(0))
    loss_fn(model, x, y)
    attacked = loss_fn.last["attacked"]
    expected = torch.randperm(15, generator=torch.Generator().manual_seed(0))[:8]
    assert attacked.sum() == 8 and attacked[expected].all()
    mixed, idx = train.half_half(
        x, y, lambda a, b: a + 1, generator=torch.Generator().manual_seed(0), return_index=True
    )
    assert torch.equal(idx, expected) and torch.equal(mixed[idx], x[idx] + 1)


def test_reference_adversarial_loss_and_errors():
    model, (x, y) = tiny_model(), tiny_data()
    for l2min, eps in ((False, 0.01), (True, 0.1)):
        loss = train.adversarial.reference_adversarial_loss(model, x, y, l2min=l2min)
        adv = reference_transcription(model, x, y, eps, 7, l2min, torch.ones(16, dtype=torch.bool))
        torch.testing.assert_close(loss, nn.functional.cross_entropy(model(adv), y), rtol=1e-6, atol=1e-6)
        assert all(p.grad is None for p in model.parameters())
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="attack must be one of 'pyadvk', 'reference'; got 'l2'"):
        train.RobustLoss(attack="l2")
    with pytest.raises(ValueError, match="fraction must be in \\[0, 1\\], got 1.5"):
        train.RobustLoss(attack="reference", fraction=1.5)
    with pytest.raises(ValueError, match="eps must be > 0.0, got 0.0"):
        train.RobustLoss(attack="reference", eps=0.0)
    with pytest.raises(ValueError, match=r"affected must be a bool tensor of shape \(16,\), got torch.float32 \(16,\)"):
        train.adversarial.reference_adversarial_images(model, x, y, affected=torch.ones(16))
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        train.adversarial.reference_adversarial_images(model, x, y, steps=0)


def test_psi0_scales_with_the_input_size():
    assert train.scaled_psi0((3, 32, 32)) == pytest.approx(220.0)  # the paper's, on CIFAR
    assert train.scaled_psi0((1, 16, 16)) == pytest.approx(220.0 * 256 / 3072)
    assert train.scaled_psi0([1, 8, 8]) == pytest.approx(220.0 * 64 / 3072)
    for bad in ((), (3, 0, 32), (3, 32.0, 32)):
        with pytest.raises(ValueError, match="input_shape must be one sample's shape"):
            train.scaled_psi0(bad)
    assert train.RobustLoss(steps=0).psi.psi0 == 220.0
    assert train.RobustLoss(steps=0, psi0=4.5).psi.psi0 == 4.5
    with pytest.raises(ValueError, match="psi0 must be > 0"):
        train.RobustLoss(steps=0, psi0=0.0)
    with pytest.raises(ValueError, match="give psi .* or psi0 .*, not both; got psi0=3"):
        train.RobustLoss(steps=0, psi=AdaptivePsi(), psi0=3)


def test_trainer_records_ce_penalty_and_psi_per_epoch(capsys):
    model, (x, y) = tiny_model(), tiny_data(16)
    loss_fn = train.RobustLoss(steps=0, psi0=2.0, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    history = train.AdversarialTrainer(model, optimizer, loader, loss_fn=loss_fn, epochs=2).fit()
    out = capsys.readouterr().out
    for record in history:
        terms = record["terms"]
        assert sorted(terms) == ["ce", "penalty", "psi"]
        # per batch loss = ce + psi * penalty; psi grows from psi0 while the CE is below its target
        assert 2.0 < terms["psi"] < 2.2
        assert record["train_loss"] == pytest.approx(terms["ce"] + terms["psi"] * terms["penalty"], rel=1e-4)
        line = train.trainer.format_record(record, 2)
        assert line in out and f"ce {terms['ce']:.4g}, penalty {terms['penalty']:.4g}, psi {terms['psi']:.4g}" in line
