"""input_gradient_penalty and AdaptivePsi (Woods et al. 2019): closed forms on linear models,
explicit Jacobians and finite differences, double backprop into the parameters, the adaptive
weight's update sequence, state, and every bad-input path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyadvk.lipschitz import AdaptivePsi, input_gradient_penalty
from pyadvk.nn import HalfHuberReLU


def linear_model(d=6, c=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(d, c).to(dtype)


def draws(batch, classes, zeta, seed):
    """The random choices the penalty makes with a generator seeded ``seed``: (logit j, margin?)."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randint(classes, (batch,), generator=gen)
    margin = torch.rand(batch, generator=gen) < zeta
    return j, margin


def closed_form_linear(model: nn.Linear, x, y, zeta, p, seed, reduction="mean"):
    """For z = W x + b: ds/dx = W[j] (random logit) or W[y] - W[k*] with k* = argmax_{k != y} z_k."""
    w = model.weight
    z = model(x).detach()
    j, margin = draws(x.shape[0], w.shape[0], zeta, seed)
    rows = []
    for b in range(x.shape[0]):
        if margin[b]:
            others = z[b].clone()
            others[y[b]] = -math.inf
            rows.append(w[y[b]] - w[int(others.argmax())])
        else:
            rows.append(w[j[b]])
    g = torch.stack(rows)
    per = g.abs().pow(p)
    return per.mean() if reduction == "mean" else per.sum(1).mean(), margin


@pytest.mark.parametrize("zeta", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("p", [1, 2, 1.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_model_closed_form(zeta, p, reduction):
    model = linear_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(4, (32,), generator=gen)
    got = input_gradient_penalty(
        model, x, y, zeta=zeta, p=p, reduction=reduction, generator=torch.Generator().manual_seed(9)
    )
    want, margin = closed_form_linear(model, x, y, zeta, p, 9, reduction)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    if zeta == 0:
        assert not margin.any()
    if zeta == 1:
        assert margin.all()
    if zeta == 0.5:
        assert margin.any() and not margin.all()  # both kinds in one batch


def test_sum_is_d_times_mean():
    model = linear_model(d=5)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(4, (8,))
    a = input_gradient_penalty(model, x, y, reduction="mean", generator=torch.Generator().manual_seed(3))
    b = input_gradient_penalty(model, x, y, reduction="sum", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b, 5 * a, rtol=1e-12, atol=0)


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        HalfHuberReLU(0.5),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        HalfHuberReLU(0.3),
        nn.Linear(4, 3),
    ).double()


@pytest.mark.parametrize("zeta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_explicit_jacobian(zeta, p):
    """A nonlinear network: the penalty against per-sample Jacobians from torch.func, and the
    chosen scores' input gradients against central finite differences."""
    net = small_net().eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(5, 2, 5, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(3, (5,), generator=gen)
    got = input_gradient_penalty(net, x, y, zeta=zeta, p=p, generator=torch.Generator().manual_seed(11))
    j, margin = draws(5, 3, zeta, 11)
    rows = []
    for b in range(5):

        def score(xb, b=b):
            z = net(xb[None])[0]
            if margin[b]:
                mask = torch.zeros(3, dtype=torch.bool)
                mask[y[b]] = True
                return z[y[b]] - z.masked_fill(mask, -math.inf).max()
            return z[j[b]]

        jac = torch.autograd.functional.jacobian(score, x[b])
        h = 1e-6
        e = torch.zeros_like(x[b]).view(-1)
        for i in (0, 7, 23, 49):  # a few coordinates by central differences
            e.zero_()
            e[i] = h
            fd = (score(x[b] + e.view_as(x[b])) - score(x[b] - e.view_as(x[b]))) / (2 * h)
            assert abs(float(fd.detach()) - float(jac.view(-1)[i])) < 1e-6
        rows.append(jac.reshape(-1))
    g = torch.stack(rows)
    torch.testing.assert_close(got, g.abs().pow(p).mean(), rtol=1e-10, atol=1e-12)


def test_gradient_flows_to_parameters_linear():
    """d penalty / dW by double backprop equals autograd of the closed form."""
    model = linear_model()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(4, (16,), generator=gen)
    pen = input_gradient_penalty(model, x, y, zeta=0.4, generator=torch.Generator().manual_seed(5))
    assert model.weight.grad is None  # no parameter .grad written while computing the penalty
    pen.backward()
    got = model.weight.grad.clone()
    model.zero_grad()
    want, _ = closed_form_linear(model, x, y, 0.4, 2, 5)
    want.backward()
    torch.testing.assert_close(got, model.weight.grad, rtol=1e-12, atol=1e-12)
    assert got.abs().sum() > 0


def test_gradient_flows_through_half_huber_matches_finite_differences():
    """gradcheck of the penalty as a function of the first (conv) weight: double backprop through
    conv, linear and both Half-Huber ReLUs' second derivatives."""
    net = small_net(1).eval()
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1])
    w0 = net[0].weight.detach().clone().requires_grad_(True)

    def penalty(w):
        params = dict(net.named_parameters())
        params["0.weight"] = w
        fn = lambda t: torch.func.functional_call(net, params, (t,))  # noqa: E731
        return input_gradient_penalty(fn, x, y, zeta=0.5, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(penalty, (w0,), eps=1e-6, atol=1e-7)
    (g,) = torch.autograd.grad(penalty(w0), w0)
    assert g.abs().sum() > 0


def test_leaves_inputs_and_parameters_alone_and_returns_logits():
    model = linear_model(dtype=torch.float32)
    x = torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 3])
    pen, logits = input_gradient_penalty(model, x, y, return_logits=True)
    torch.testing.assert_close(logits, model(x))
    assert logits.requires_grad and pen.dtype == torch.float32 and pen.dim() == 0
    assert x.grad is None and not x.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # With an x that already requires grad, the gradient is taken wrt that x (no .grad written).
    xr = x.clone().requires_grad_(True)
    input_gradient_penalty(model, xr, y)
    assert xr.grad is None


def test_generator_reproducible():
    model = small_net()
    x = torch.rand(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(3, (6,))
    a = input_gradient_penalty(model, x, y, zeta=0.5, generator=torch.Generator().manual_seed(1))
    b = input_gradient_penalty(model, x, y, zeta=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_bad_inputs():
    model = linear_model(dtype=torch.float32)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    cases = [
        (dict(zeta=-0.1), ValueError, r"zeta must be >= 0.0, got -0.1"),
        (dict(zeta=1.5), ValueError, r"zeta must be in \[0, 1\], got 1.5"),
        (dict(p=0), ValueError, r"p must be > 0.0, got 0.0"),
        (dict(p=-2), ValueError, r"p must be > 0.0, got -2.0"),
        (dict(p=math.inf), ValueError, "p must be finite"),
        (dict(reduction="max"), ValueError, "reduction must be one of 'mean', 'sum'; got 'max'"),
        (dict(generator=3), TypeError, "generator must be a torch.Generator"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            input_gradient_penalty(model, x, y, **kw)
    with pytest.raises(ValueError, match=r"y must have shape \(4,\) .* got \(3,\)"):
        input_gradient_penalty(model, x, y[:3])
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        input_gradient_penalty(model, x, y[:, None])
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        input_gradient_penalty(model, x, y.float())
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        input_gradient_penalty(model, x, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 4\), got 4"):
        input_gradient_penalty(model, x, torch.tensor([0, 1, 4, 3]))
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 4\), got -1"):
        input_gradient_penalty(model, x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="x must be float32"):
        input_gradient_penalty(model, torch.ones(4, 6, dtype=torch.long), y)
    with pytest.raises(ValueError, match="x must hold at least one sample"):
        input_gradient_penalty(model, torch.randn(0, 6), y[:0])
    with pytest.raises(TypeError, match="model must be callable"):
        input_gradient_penalty("net", x, y)
    with pytest.raises(ValueError, match=r"model\(x\) must return logits of shape \(4, C\), got \(4, 2, 2\)"):
        input_gradient_penalty(lambda t: t[:, :4].reshape(4, 2, 2), x, y)
    with pytest.raises(ValueError, match="at least 2 logits"):
        input_gradient_penalty(lambda t: t[:, :1], x, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# AdaptivePsi.


def test_adaptive_psi_update_sequence():
    """S <- max(0, S + clip(-ln(L/1.5), -0.01, 1)); psi = 220 exp(0.02 S). Values by hand:
    -ln(1.0/1.5) = ln 1.5 = 0.4054651081; -ln(2/1.5) = -0.2876820725 -> -0.01;
    -ln(0.1/1.5) = ln 15 = 2.7080502011 -> 1; -ln(1.4/1.5) = 0.0689928715."""
    psi = AdaptivePsi()
    assert psi.psi == 220.0 and float(psi.integral) == 0.0
    # A loss above the target at S = 0 keeps S at 0 (never negative).
    assert psi.update(3.0) == 220.0 and float(psi.integral) == 0.0
    expected_s = [0.4054651081, 0.3954651081, 0.3954651081, 1.3954651081, 1.3854651081, 1.4544579796]
    for loss, s in zip([1.0, 2.0, 1.5, 0.1, 100.0, torch.tensor(1.4, dtype=torch.float64)], expected_s):
        new_psi = psi.update(loss)
        assert float(psi.integral) == pytest.approx(s, abs=1e-9)
        assert new_psi == pytest.approx(220.0 * math.exp(0.02 * s), rel=1e-12)
    assert psi.psi == pytest.approx(220 * 1.0295164, rel=1e-7)  # exp(0.02 * 1.4544580) = 1.0295164
    # Below the target psi grows; above it shrinks (sign convention).
    before = psi.psi
    assert psi.update(1.0) > before
    before = psi.psi
    assert psi.update(2.0) < before
    # A zero loss is the largest step, an infinite one the smallest.
    s0 = float(psi.integral)
    psi.update(0.0)
    assert float(psi.integral) == pytest.approx(s0 + 1.0)
    psi.update(math.inf)
    assert float(psi.integral) == pytest.approx(s0 + 0.99)


def test_adaptive_psi_other_parameters():
    psi = AdaptivePsi(psi0=10, k=0.5, target_loss=2.0, eps_pos=0.1, eps_neg=0.05)
    psi.update(1.0)  # -ln(0.5) = 0.693 -> clipped to 0.1
    assert psi.psi == pytest.approx(10 * math.exp(0.05))
    psi.update(2.2)  # -ln(1.1) = -0.0953 -> -0.05
    assert float(psi.integral) == pytest.approx(0.05)
    psi.update(2.1)  # -ln(1.05) = -0.04879
    assert float(psi.integral) == pytest.approx(0.05 - math.log(1.05))
    assert psi() == psi.psi


def test_adaptive_psi_state_dict_round_trip():
    a = AdaptivePsi()
    for loss in (1.0, 0.5, 0.2):
        a.update(loss)
    state = a.state_dict()
    assert list(state) == ["integral"] and state["integral"].dtype == torch.float64
    b = AdaptivePsi()
    assert b.psi == 220.0
    b.load_state_dict(state)
    assert b.psi == a.psi and float(b.integral) == float(a.integral)
    a.update(1.0)
    assert b.psi != a.psi  # a copy, not shared
    assert "psi0=220.0" in repr(a) and "sync=False" in repr(a)


def _sync_rank(rank, tmp):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        psi = AdaptivePsi(sync=True)
        for losses in ((1.0, 2.0), (0.2, 0.4), (3.0, 1.0)):  # means 1.5, 0.3, 2.0
            psi.update(torch.tensor(losses[rank], dtype=torch.float64))
        torch.save(psi.state_dict(), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_adaptive_psi_sync_averages_over_ranks(tmp_path):
    """sync=True: two gloo ranks passing different losses make the same update, that of the mean
    loss; without an initialized process group sync is a no-op."""
    import torch.multiprocessing as mp

    a, b = AdaptivePsi(sync=True), AdaptivePsi()
    assert a.update(1.0) == b.update(1.0)
    mp.spawn(_sync_rank, args=(str(tmp_path),), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt")["integral"]
    s1 = torch.load(tmp_path / "rank1.pt")["integral"]
    want = AdaptivePsi()
    for mean in (1.5, 0.3, 2.0):
        want.update(mean)
    assert float(s0) == float(s1) == pytest.approx(float(want.integral), abs=1e-12)
    assert float(s0) == pytest.approx(0.99, abs=1e-12)  # 0, then +1 (clipped), then -0.01


def test_adaptive_psi_bad_inputs():
    for kw, err, match in [
        (dict(psi0=0), ValueError, r"psi0 must be > 0.0, got 0.0"),
        (dict(psi0=-1), ValueError, r"psi0 must be > 0.0, got -1.0"),
        (dict(target_loss=0), ValueError, r"target_loss must be > 0.0, got 0.0"),
        (dict(target_loss=-1.5), ValueError, r"target_loss must be > 0.0"),
        (dict(eps_pos=-1), ValueError, r"eps_pos must be >= 0.0, got -1.0"),
        (dict(eps_neg=-0.01), ValueError, r"eps_neg must be >= 0.0, got -0.01"),
        (dict(k=math.nan), ValueError, "k must not be NaN"),
        (dict(k=math.inf), ValueError, "k must be finite, got inf"),
        (dict(psi0="220"), TypeError, "psi0 must be a real number"),
        (dict(sync=1), TypeError, "sync must be a bool"),
    ]:
        with pytest.raises(err, match=match):
            AdaptivePsi(**kw)
    psi = AdaptivePsi()
    with pytest.raises(ValueError, match=r"loss_ce must be a cross-entropy \(>= 0, not NaN\), got -1.0"):
        psi.update(-1.0)
    with pytest.raises(ValueError, match="got nan"):
        psi.update(torch.tensor(math.nan))
    with pytest.raises(ValueError, match=r"loss_ce must be a scalar, got a tensor of shape \(2,\)"):
        psi.update(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="loss_ce must be a real number"):
        psi.update("1.0")
    assert float(psi.integral) == 0.0  # failed updates change nothing


@pytest.mark.parametrize("body", ["cpp", "triton"])
def test_penalty_same_on_every_half_huber_body(body):
    """The penalty and its parameter gradients through the fused Half-Huber bodies equal those
    through the torch body (float32: every op is bit-compatible, so only the network's own
    rounding could differ, and it is the same network)."""
    from pyadvk.ops import half_huber as hh
    from tests.conftest import available

    if body not in available(hh.HALF_HUBER, "cpu"):
        pytest.skip(f"{body} body not available here")

    def net_with(backend):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            HalfHuberReLU(0.5, backend=backend),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 6),
            HalfHuberReLU(0.3, backend=backend),
            nn.Linear(6, 3),
        )

    x = torch.rand(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    results = []
    for backend in ("torch", body):
        net = net_with(backend)
        pen = input_gradient_penalty(net, x, y, zeta=0.5, generator=torch.Generator().manual_seed(2))
        pen.backward()
        results.append((pen.detach(), [p.grad for p in net.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
