"""RobustLoss (Woods et al. 2019 as one training loss): formula, state, checkpoints, DDP."""

from __future__ import annotations

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


def test_ddp_psi_and_weights_identical_on_every_rank(tmp_path):
    """Different shards per rank, yet psi (updated from the all-reduced CE) and the weights
    stay identical across ranks; the attack's input gradients do not break DDP."""
    _spawn(_robust_rank, tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["psi"][0], out["psi"][1])
    assert torch.equal(out["weights"][0], out["weights"][1])
