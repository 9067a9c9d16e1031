"""Model-level spectral norms, the Lipschitz bound, the Lipschitz penalty and
pyadvk.nn.spectral_norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyadvk import models
from pyadvk.lipschitz import (
    LipschitzPenalty,
    SpectralNormState,
    clear_state,
    lipschitz_bound,
    spectral_norms,
)
from pyadvk.lipschitz import model as lip_model
from pyadvk.nn import spectral_norm
from tests.test_lipschitz_conv import true_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        models.BasicBlock(8, 8, 1, "relu"),
        models.BasicBlock(8, 12, 2, "relu"),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    return randomize_bn(net)


def small_models():
    torch.manual_seed(1)
    yield "small_cnn", models.SmallCNN(in_channels=1, input_size=8, width=4).eval(), (1, 8, 8)
    yield "resnet_blocks", small_resnet(), (2, 8, 8)
    torch.manual_seed(2)
    seq = nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2),
        nn.LeakyReLU(0.1),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(4 * 3, 6),
        nn.Tanh(),
        nn.Dropout(0.2),
        nn.Linear(6, 2),
    ).eval()
    yield "seq1d", seq, (3, 14)
    torch.manual_seed(3)
    yield "linear_only", nn.Sequential(nn.Linear(7, 9), nn.GELU(), nn.Linear(9, 3)).eval(), (7,)


@pytest.mark.parametrize("name,model,shape", list(small_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_bound_above_empirical_lipschitz(name, model, shape):
    gen = torch.Generator().manual_seed(7)
    bound = float(lipschitz_bound(model, shape, method="gram", n_iters=6))
    assert bound > 0
    with torch.no_grad():
        x = torch.randn(64, *shape, generator=gen)
        y = x + 1e-2 * torch.randn(64, *shape, generator=gen)
        far = torch.randn(64, *shape, generator=gen)
        ratios = []
        for a, b in ((x, y), (x, far)):
            num = (model(a) - model(b)).flatten(1).norm(dim=1)
            ratios.append(num / (a - b).flatten(1).norm(dim=1))
    assert float(torch.cat(ratios).max()) <= bound
    # the input-gradient norm of any unit-weighted output is at most the Jacobian norm
    x = torch.randn(16, *shape, generator=gen, requires_grad=True)
    out = model(x)
    w = torch.randn(out.shape, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert float(g.flatten(1).norm(dim=1).max()) <= bound
    # power-method norms give (nearly) the same product from below; never far above gram's
    power = float(lipschitz_bound(model, shape, method="power", n_iters=300))
    assert power <= bound * (1 + 1e-4)


def test_bound_training_mode_model_untouched():
    model = small_resnet().train()
    before = copy.deepcopy(model.state_dict())
    lipschitz_bound(model, (2, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched


def test_bound_residual_rule_exact_for_linear_block():
    """A linear residual block: bound = act · (branch + shortcut) with the layer norms."""
    block = models.BasicBlock(2, 2, 1, "relu")
    randomize_bn(block, 3)
    norms = spectral_norms(block, (2, 5, 5), "gram", 8)
    bn = lambda m: float((m.weight.detach().abs() / torch.sqrt(m.running_var + m.eps)).max())  # noqa: E731
    expected = float(norms["conv1"]) * bn(block.bn1) * float(norms["conv2"]) * bn(block.bn2) + 1.0
    got = float(lipschitz_bound(block, (2, 5, 5), "gram", 8))
    assert abs(got - expected) <= 1e-5 * expected


def test_spectral_norms_methods():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)
    )
    shape = (2, 6, 6)
    exact = {
        "0": true_norm(model[0], (2, 6, 6)),
        "2": true_norm(model[2], (3, 6, 6)),
        "4": float(torch.linalg.matrix_norm(model[4].weight.detach().double(), ord=2)),
    }
    reshaped_exact = {
        n: float(torch.linalg.matrix_norm(model[int(n)].weight.detach().double().flatten(1), ord=2)) for n in exact
    }
    state = SpectralNormState(torch.Generator().manual_seed(0))
    power = spectral_norms(model, shape, "power", 1000, state=state)
    gram = spectral_norms(model, shape, "gram", 8)
    reshaped = spectral_norms(model, None, "reshaped", 300)
    assert list(power) == ["0", "2", "4"] == list(gram) == list(reshaped)
    for n in exact:
        assert exact[n] * (1 - 2e-3) <= float(power[n]) <= exact[n] * (1 + 1e-5)
        assert float(gram[n]) >= exact[n] * (1 - 1e-5)
        assert abs(float(reshaped[n]) - reshaped_exact[n]) <= 1e-4 * reshaped_exact[n]
    assert set(state.convs) == {"0", "2"} and set(state.us) == {"4"}


def test_spectral_norms_warm_start_cache():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    clear_state(model)
    exact = torch.linalg.matrix_norm(model[0].weight.detach().double(), ord=2)
    first = spectral_norms(model, None, "reshaped", 1)["0"]
    for _ in range(200):  # cached state: 200 warm-started single iterations converge
        last = spectral_norms(model, None, "reshaped", 1)["0"]
    assert abs(float(last) - float(exact)) <= 1e-4 * float(exact)
    assert float(first) < float(last)
    clear_state(model)
    again = spectral_norms(model, None, "reshaped", 1)["0"]
    assert float(again) < float(last)


def test_penalty_gradient_is_u_vT():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 5))
    for method in ("reshaped", "power"):
        pen = LipschitzPenalty(model, (2, 4, 4), kind="hinge", target=0.1, method=method, init_iters=500)
        value = pen()
        model.zero_grad()
        value.backward()
        for name, layer in (("0", model[0]), ("3", model[3])):
            sigma = pen.last_sigmas[name]
            u = getattr(pen, f"u_{name}")
            v = getattr(pen, f"v_{name}")
            coef = 2 * torch.relu(sigma - 0.1)
            if method == "reshaped" or name == "3":
                expected = coef * torch.outer(u, v).reshape(layer.weight.shape)
            else:  # true conv norm: d<u, conv(v; W)>/dW, the correlation of u and v
                w = layer.weight.detach().clone().requires_grad_()
                (g,) = torch.autograd.grad((u * layer._conv_forward(v, w, None)).sum(), w)
                expected = coef * g
            torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)
        # numerically: at convergence dσ/dW is the derivative of the true top singular value
        lin = model[3]
        direction = torch.randn_like(lin.weight)
        h = 1e-3
        wd = lin.weight.detach().double()
        s = lambda w: torch.linalg.matrix_norm(w, ord=2)  # noqa: E731
        fd = (s(wd + h * direction) - s(wd - h * direction)) / (2 * h)
        analytic = (torch.outer(pen.u_3, pen.v_3).double() * direction).sum()
        assert abs(float(fd - analytic)) <= 1e-3 * abs(float(fd)) + 1e-6


def test_penalty_kinds_state_dict_and_ranks():
    torch.manual_seed(7)
    model = models.SmallCNN(in_channels=1, input_size=8, width=4)
    pen = LipschitzPenalty(model, (1, 8, 8), kind="log", method="power", n_iters=1, init_iters=30)
    # a second "rank" built from identical weights and the same seed computes the same value
    other = LipschitzPenalty(model, (1, 8, 8), kind="log", method="power", n_iters=1, init_iters=30)
    val = pen()
    assert torch.equal(other(), val)
    sig = torch.stack(list(pen.last_sigmas.values()))
    assert torch.allclose(val, torch.log(sig).pow(2).sum(), rtol=1e-5)
    sd = pen.state_dict()
    assert set(sd) == {f"{p}_{n.replace('.', '_')}" for n, _ in lip_model.layers_of(model) for p in "uv"}
    # eval mode: no update, the value is reproducible
    pen.eval()
    assert torch.equal(pen(), pen())
    # loading the state dict into a fresh penalty reproduces the value
    fresh = LipschitzPenalty(model, (1, 8, 8), kind="log", method="power", init_iters=0).eval()
    fresh.load_state_dict(sd)
    pen.load_state_dict(sd)
    assert torch.equal(fresh(), pen())
    hinge = LipschitzPenalty(model, kind="hinge", target=1e9)
    assert float(hinge()) == 0.0


def test_spectral_norm_linear_matches_torch():
    torch.manual_seed(8)
    a = nn.Linear(10, 7)
    b = copy.deepcopy(a)
    ours = spectral_norm(a, n_power_iterations=200)
    ref = torch.nn.utils.parametrizations.spectral_norm(b, n_power_iterations=200)
    ours(torch.randn(2, 10))
    ref(torch.randn(2, 10))
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert abs(float(torch.linalg.matrix_norm(ours.weight.double(), ord=2)) - 1) < 1e-4


def test_spectral_norm_conv_true_norm():
    torch.manual_seed(9)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    raw = conv.weight.detach().clone()
    exact = true_norm(conv, (2, 6, 7))
    spectral_norm(conv, n_power_iterations=1, input_shape=(2, 6, 7))
    conv.train()
    for _ in range(300):
        w = conv.weight
    torch.testing.assert_close(w, raw / exact, rtol=2e-3, atol=1e-6)
    normalized = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    with torch.no_grad():
        normalized.weight.copy_(w)
    assert abs(true_norm(normalized, (2, 6, 7)) - 1) < 2e-3
    # differentiable, and eval mode does not update the buffers
    y = conv(torch.randn(1, 2, 6, 7))
    y.sum().backward()
    assert conv.parametrizations.weight.original.grad is not None
    conv.eval()
    u = conv.parametrizations.weight[0]._u.clone()
    _ = conv.weight  # recomputes the parametrization
    assert torch.equal(u, conv.parametrizations.weight[0]._u)
    assert "parametrizations.weight.0._v" in conv.state_dict()


def test_bad_input():
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no nn.Linear or nn.Conv1d/2d/3d layer"):
        spectral_norms(nn.Sequential(nn.ReLU(), nn.Flatten()), (3,))
    with pytest.raises(ValueError, match="has no nn.Linear"):
        LipschitzPenalty(nn.ReLU())
    with pytest.raises(ValueError, match="has no nn.Linear"):
        lipschitz_bound(nn.Sequential(nn.ReLU()), (3,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4, 2))
    with pytest.raises(ValueError, match=r"input_shape \(3, 7, 7\) does not fit the model \(Sequential\)"):
        spectral_norms(model, (3, 7, 7), "power")
    with pytest.raises(ValueError, match=r"input_shape must be a tuple of positive ints .* got \(3, 0, 6\)"):
        lipschitz_bound(model, (3, 0, 6))
    with pytest.raises(ValueError, match="input_shape is needed for method='gram'"):
        spectral_norms(model, None, "gram")
    with pytest.raises(ValueError, match="method must be one of"):
        spectral_norms(model, (3, 6, 6), "exact")
    with pytest.raises(ValueError, match="n_iters must be >= 1, got 0"):
        spectral_norms(model, (3, 6, 6), "power", 0)
    with pytest.raises(TypeError, match=r"cannot bound module '1' of type Softmax"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), (3,))
    with pytest.raises(ValueError, match="kind must be one of"):
        LipschitzPenalty(model, (3, 6, 6), kind="l2")
    with pytest.raises(ValueError, match="target must be > 0.0"):
        LipschitzPenalty(model, (3, 6, 6), target=0)
    with pytest.raises(ValueError, match="n_iters must be >= 1, got 0"):
        LipschitzPenalty(model, (3, 6, 6), n_iters=0)
    with pytest.raises(ValueError, match="input_shape is needed for method='power'"):
        LipschitzPenalty(model, None, method="power")
    with pytest.raises(ValueError, match="input_shape is required for Conv2d"):
        spectral_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"input_shape \(4, 8, 8\) does not fit .*4 channels, the layer takes 3"):
        spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(4, 8, 8))
    with pytest.raises(ValueError, match="n_power_iterations must be >= 1, got 0"):
        spectral_norm(nn.Conv2d(3, 4, 3), n_power_iterations=0, input_shape=(3, 8, 8))
    with pytest.raises(TypeError, match="no true operator norm for transposed convolutions"):
        spectral_norm(nn.ConvTranspose2d(3, 4, 3), input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="BatchNorm '1' keeps no running statistics"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), (3, 4, 4))


def _conv_net(seed: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


@pytest.mark.parametrize("method", ["power", "reshaped"])
def test_cold_starts_are_seeded(method):
    """spectral_norms and lipschitz_bound start cold from generator= (the same seed, the same
    norms; another seed, other norms after 2 iterations); a given state carries its own."""
    model = _conv_net()

    def norms(seed, model=model):
        clear_state(model)
        return spectral_norms(model, (2, 5, 5), method, 2, generator=torch.Generator().manual_seed(seed))

    a, b, c = norms(1), norms(1), norms(2)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[n], c[n]) for n in a)
    clear_state(model)
    bound = lipschitz_bound(model, (2, 5, 5), method, 2, generator=torch.Generator().manual_seed(1))
    clear_state(model)
    assert torch.equal(bound, lipschitz_bound(model, (2, 5, 5), method, 2, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="a SpectralNormState carries its own generator"):
        spectral_norms(model, (2, 5, 5), method, state=SpectralNormState(), generator=torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        SpectralNormState(3)


def test_penalty_generator():
    """LipschitzPenalty draws its start vectors from generator= when given (else from seed)."""
    model = _conv_net()
    for method in ("reshaped", "power"):
        a = LipschitzPenalty(model, (2, 5, 5), method=method, generator=torch.Generator().manual_seed(7), init_iters=0)
        b = LipschitzPenalty(model, (2, 5, 5), method=method, generator=torch.Generator().manual_seed(7), init_iters=0)
        c = LipschitzPenalty(model, (2, 5, 5), method=method, seed=7, init_iters=0)
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]) and torch.equal(value, c.state_dict()[key]), key
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        LipschitzPenalty(model, (2, 5, 5), generator=7)


@pytest.mark.parametrize("method", ["power", "reshaped", "gram"])
def test_check_values_false_gives_nan_not_a_number(method):
    """Without the value check (no host sync) a non-finite layer's σ is NaN or inf, never finite;
    the other layers keep their norms."""
    model = _conv_net()
    with torch.no_grad():
        model[0].weight.view(-1)[3] = float("nan")
    out = spectral_norms(model, (2, 5, 5), method, 3, check_values=False)
    assert not torch.isfinite(out["0"]), out
    assert torch.isfinite(out["3"]) and out["3"] > 0


@pytest.mark.parametrize("method", ["power", "reshaped"])
def test_huge_and_tiny_weights(method):
    """Weights scaled by 2^±100 (~1e±30) give the norms scaled by 2^±100 (the norms are float64:
    float32 squares overflow or underflow at these magnitudes and used to give 0)."""
    model = _conv_net()
    base = spectral_norms(model, (2, 5, 5), method, 4, state=SpectralNormState(torch.Generator().manual_seed(0)))
    for k in (100, -100):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for p in scaled.parameters():
                p.mul_(2.0**k)
        out = spectral_norms(scaled, (2, 5, 5), method, 4, state=SpectralNormState(torch.Generator().manual_seed(0)))
        for name in base:
            torch.testing.assert_close(out[name], base[name] * 2.0**k, rtol=1e-6, atol=0, msg=f"{name} 2^{k}")
