"""metrics.evaluate: the cascade's worst case per image and over attacks, and each warning sign of a
masked or broken evaluation firing on a model built to show it and staying quiet on an honest one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk.attacks import PGD
from pyadvk.attacks.square import Square
from pyadvk.metrics.evaluate import Evaluation, evaluate, is_black_box, sweep_check

CLASSES, SHAPE, N = 4, (1, 4, 4), 48


@pytest.fixture(autouse=True)
def _tiny_ops(one_thread):
    """Every test here runs many tiny ops: one intra-op thread (see tests/conftest.py)."""


def _data(seed: int = 0):
    """N images in [0, 1] around 4 class centres; returns (centres (C, D), images, labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.2 + 0.6 * torch.rand(CLASSES, 16, generator=g)
    labels = torch.arange(N) % CLASSES
    images = (centres[labels] + 0.1 * (2 * torch.rand(N, 16, generator=g) - 1)).clamp(0, 1)
    return centres, images.view(N, *SHAPE), labels


class Template(nn.Module):
    """Nearest-centre classifier: logits ``scale·(x·c_k − ‖c_k‖²/2)`` (linear in x)."""

    def __init__(self, centres: torch.Tensor, scale: float = 8.0):
        super().__init__()
        self.linear = nn.Linear(centres.shape[1], centres.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(scale * centres)
            self.linear.bias.copy_(-scale * centres.pow(2).sum(dim=1) / 2)

    def forward(self, x):
        return self.linear(x.flatten(1))


class Saturated(nn.Module):
    """Softmax saturation: logits times 1e4, so the cross-entropy gradient of a correctly classified
    image is exactly zero in float32."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1e4 * self.inner(x)


class Rounded(nn.Module):
    """A flat model: the input rounded to 1/2 (zero gradient almost everywhere)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(2 * x) / 2)


class Noisy(nn.Module):
    """A randomized defence: Gaussian noise on the input at every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Obfuscated(nn.Module):
    """Masked gradient: the forward is the honest model, the backward points the opposite way."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(_Reverse.apply(x))


class FiniteDifference:
    """A gradient-free stand-in for Square: estimates the gradient of the margin
    ``max_{j≠y} z_j − z_y`` by forward differences (no autograd) and takes L∞ sign steps."""

    black_box = True

    def __init__(self, model, eps, steps=5, h=1e-3):
        self.model, self.eps, self.steps, self.h = model, eps, steps, h

    def _margin(self, x, y):
        z = self.model(x)
        other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return other - z.gather(1, y[:, None])[:, 0]

    @torch.no_grad()
    def __call__(self, images, labels):
        x = images.clone()
        flat = x.view(len(x), -1)
        for _ in range(self.steps):
            base = self._margin(x, labels)
            grad = torch.zeros_like(flat)
            for i in range(flat.shape[1]):
                probe = flat.clone()
                probe[:, i] += self.h
                grad[:, i] = (self._margin(probe.view_as(x), labels) - base) / self.h
            flat = (flat + self.eps / 2 * grad.sign()).clamp(images.view(len(x), -1) - self.eps)
            flat = flat.clamp(max=images.view(len(x), -1) + self.eps).clamp(0, 1)
            x = flat.view_as(images)
        return x


def _exact_linf(model: Template, images, labels) -> torch.Tensor:
    """The smallest L∞ perturbation that reaches another class (box ignored)."""
    w = model.linear.weight.detach()
    with torch.no_grad():
        z = model(images)
    zy = z.gather(1, labels[:, None])
    d = (zy - z) / (w[labels][:, None, :] - w[None]).abs().sum(dim=2).clamp_min(1e-12)
    return d.scatter(1, labels[:, None], float("inf")).amin(dim=1)


@pytest.fixture(scope="module")
def setup():
    centres, images, labels = _data()
    model = Template(centres).eval()
    eps = float(_exact_linf(model, images, labels).median())
    loader = DataLoader(TensorDataset(images, labels), batch_size=20)
    return model, loader, eps, images, labels


def margin_loss(logits, labels):
    """Mean of ``max_{j≠y} z_j − z_y``: on a linear model its L∞ ascent reaches the nearest boundary
    (the cross-entropy mixes every class into its gradient and can stop short)."""
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return (other - logits.gather(1, labels[:, None])[:, 0]).mean()


def _pgd(model, eps, steps=30, **kw):
    return PGD(model, eps=eps, alpha=eps / 8, steps=steps, random_start=False, **kw)


def _margin_pgd(model, eps, steps=30):
    return _pgd(model, eps, steps, loss=margin_loss)


def _honest_attacks(model, eps):
    return [("PGD", _margin_pgd(model, eps)), ("FD", FiniteDifference(model, eps))]


def _run(model, loader, eps, attacks, **kw) -> Evaluation:
    kw.setdefault("sweep_steps", 20)
    return evaluate(model, loader, eps=eps, attacks=attacks, progress=False, **kw)


def test_honest_model_passes_every_check(setup):
    model, loader, eps, images, labels = setup
    ev = _run(model, loader, eps, _honest_attacks(model, eps))
    assert [c.name for c in ev.checks] == ["randomness", "black_box", "zero_gradients", "eps_sweep", "budget"]
    assert all(c.status == "pass" for c in ev.checks), ev.to_markdown()
    assert ev.trustworthy and not ev.warnings
    # The exact robust accuracy of a linear model is known: no attack can beat it, PGD reaches it.
    exact = float((_exact_linf(model, images, labels) > eps).double().mean())
    assert ev.clean_accuracy == 1.0
    assert ev.robust_accuracy >= exact - 1e-12
    assert ev.robust_accuracy <= exact + 2 / N
    assert 0 < ev.robust_accuracy < ev.clean_accuracy
    assert ev.sweep_eps == pytest.approx([f * eps for f in (0.25, 0.5, 1, 2, 4, 16)])
    assert ev.sweep_accuracy[-1] <= 1 / CLASSES


def test_worst_case_is_per_image_and_over_attacks(setup):
    model, loader, eps, images, labels = setup
    seen: dict[int, list[torch.Tensor]] = {1: [], 2: []}

    def toward(shift, record=True):
        attack = _pgd(model, eps, targeted=True)

        def run(x, y):
            if record:
                seen[shift].append(x.clone())
            return attack(x, (y + shift) % CLASSES)

        return run

    ev = _run(model, loader, eps, [("to+1", toward(1)), ("to+2", toward(2))], eps_sweep=[])
    # Each attack alone, on every image.
    with torch.no_grad():
        alone = {s: model(toward(s, record=False)(images, labels)).argmax(dim=1) != labels for s in (1, 2)}
    assert alone[1].any() and alone[2].any() and (alone[1] != alone[2]).any()
    expected = ~(alone[1] | alone[2])
    assert ev.robust_accuracy == pytest.approx(float(expected.double().mean()))
    assert ev.robust_accuracy < min(1 - float(a.double().mean()) for a in alone.values())
    assert torch.equal(ev.broken_by == -1, expected)
    assert torch.equal(ev.broken_by == 0, alone[1])
    assert torch.equal(ev.broken_by == 1, alone[2] & ~alone[1])
    # The first attack saw every image, the second only those the first one failed on.
    assert torch.equal(torch.cat(seen[1]), images)
    assert torch.equal(torch.cat(seen[2]), images[~alone[1]])
    a, b = ev.attacks
    assert (a.attacked, a.broken) == (N, int(alone[1].sum()))
    assert (b.attacked, b.broken) == (N - a.broken, int((alone[2] & ~alone[1]).sum()))
    assert b.robust_accuracy == ev.robust_accuracy and a.robust_accuracy >= b.robust_accuracy
    assert all(r.seconds >= 0 for r in ev.attacks)


def test_masked_gradient_black_box_warns(setup):
    model, loader, eps, _, _ = setup
    masked = Obfuscated(model)
    ev = _run(masked, loader, eps, [("PGD", _margin_pgd(masked, eps)), ("FD", FiniteDifference(masked, eps))])
    check = ev.check("black_box")
    assert check.status == "warn", ev.to_markdown()
    pgd, fd = ev.attacks
    assert pgd.broken == 0 and fd.broken > 0 and check.values["images"] == fd.broken
    assert ev.check("zero_gradients").status == "pass"
    assert not ev.trustworthy and "black_box" in ev.to_markdown()
    # The same model, honest gradients: no warning.
    assert _run(model, loader, eps, _honest_attacks(model, eps), eps_sweep=[]).check("black_box").status == "pass"


@pytest.mark.parametrize("wrap", [Saturated, Rounded], ids=["saturated", "rounded"])
def test_zero_gradients_warn(setup, wrap):
    model, loader, eps, _, _ = setup
    flat = wrap(model)
    ev = _run(flat, loader, eps, [("PGD", _pgd(flat, eps))], eps_sweep=[])
    check = ev.check("zero_gradients")
    assert check.status == "warn", ev.to_markdown()
    assert check.values["share"] > 0.5 and check.values["zero"] > 0
    assert ev.check("randomness").status == "pass"


def test_flat_model_fails_the_sweep(setup):
    """PGD cannot move on a rounded model (zero gradient, no random start): robust accuracy stays
    above chance at 16·eps."""
    model, loader, eps, _, _ = setup
    flat = Rounded(model)
    ev = _run(flat, loader, eps, "pgd", steps=10, sweep_steps=5)
    sweep = ev.check("eps_sweep")
    assert sweep.status == "warn" and "above chance" in sweep.message
    assert ev.sweep_accuracy[-1] > 1 / CLASSES
    assert ev.attacks[0].name == "PGD-10"


def test_randomized_model_warns(setup):
    model, loader, eps, _, _ = setup
    noisy = Noisy(model)
    ev = _run(noisy, loader, eps, [("PGD", _pgd(noisy, eps, steps=5))], eps_sweep=[])
    check = ev.check("randomness")
    assert check.status == "warn" and 'version="rand"' in check.message
    assert check.values["max_abs_logit_difference"] > 0


def test_dropout_in_train_mode_warns_and_mode_and_grads_are_untouched(setup):
    model, loader, eps, _, _ = setup
    net = nn.Sequential(nn.Dropout(0.5), model).train()
    ev = _run(net, loader, eps, [("PGD", _pgd(net, eps, steps=3))], eps_sweep=[eps])
    assert ev.check("randomness").status == "warn"
    assert net.training and net[0].training
    assert all(p.grad is None for p in net.parameters())
    model.eval()
    _run(model, loader, eps, [("PGD", _pgd(model, eps, steps=3))], eps_sweep=[eps])
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_out_of_budget_images_do_not_count(setup):
    model, loader, eps, _, _ = setup
    pgd = _pgd(model, 4 * eps)
    ev = _run(model, loader, eps, [("too far", pgd)], eps_sweep=[])
    assert ev.check("budget").status == "warn"
    assert ev.attacks[0].out_of_budget > 0 and ev.attacks[0].broken == 0
    assert ev.robust_accuracy == ev.clean_accuracy


def test_sweep_check_numbers():
    assert sweep_check([1, 2, 4], [0.8, 0.5, 0.0], 10, 100).status == "pass"
    rising = sweep_check([1, 2, 4], [0.5, 0.7, 0.0], 10, 100)
    assert rising.status == "warn" and "rises" in rising.message and rising.values["rises"] == 1
    high = sweep_check([1, 2, 4], [0.8, 0.5, 0.3], 10, 100)
    assert high.status == "warn" and "above chance" in high.message
    # Within one image (1/n) or one point: not a rise.
    assert sweep_check([1, 2], [0.50, 0.505], 2, 100).status == "pass"


def test_presets_and_to_dict(setup):
    model, loader, eps, _, _ = setup
    ev = _run(model, loader, eps, "pgd", steps=20, n=30)
    assert ev.n == 30 and [a.name for a in ev.attacks] == ["PGD-20"]
    assert ev.sweep_attack.endswith("-20")
    assert ev.check("black_box").status == "skipped"
    d = ev.to_dict()
    assert d["n"] == 30 and d["robust_accuracy"] == ev.robust_accuracy and len(d["checks"]) == 5
    assert d["sweep"]["eps"] == ev.sweep_eps and d["trustworthy"] == ev.trustworthy
    md = ev.to_markdown()
    assert "PGD-20" in md and "Worst-case robust accuracy" in md and "Verdict" in md
    assert is_black_box(FiniteDifference(model, eps)) and is_black_box(Square(model, eps=eps))
    assert not is_black_box(_pgd(model, eps))


@pytest.mark.slow
def test_autoattack_preset_on_a_linear_model(setup):
    """AutoAttack's components as the cascade: never above the exact robust accuracy of a linear
    model, at most one image above it, and every check quiet on this honest model."""
    model, loader, eps, images, labels = setup
    ev = _run(model, loader, eps, "autoattack", sweep_steps=10)
    assert [a.name for a in ev.attacks] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert [a.black_box for a in ev.attacks] == [False, False, False, True]
    exact = float((_exact_linf(model, images, labels) > eps).double().mean())
    assert exact - 1e-12 <= ev.robust_accuracy <= exact + 1 / N
    assert all(c.status == "pass" for c in ev.checks), ev.to_markdown()
    assert ev.sweep_attack == "APGD-CE-10"


@pytest.mark.slow
def test_autoattack_preset_finds_masked_gradients(setup):
    """Reversed gradients defeat APGD and FAB; Square, which reads no gradient, breaks the images."""
    model, loader, eps, _, _ = setup
    masked = Obfuscated(model)
    ev = _run(masked, loader, eps, "autoattack", eps_sweep=[])
    square = ev.attacks[-1]
    assert square.name == "Square" and square.broken > 0
    assert sum(a.broken for a in ev.attacks[:-1]) < square.broken
    check = ev.check("black_box")
    assert check.status == "warn" and check.values["images"] == square.broken


def test_apgd_preset_drops_apgd_t_below_four_classes(setup):
    model, _, eps, images, labels = setup
    keep = labels < 3
    three = Template(model.linear.weight.detach()[:3] / 8)  # the first three classes of the same model
    loader = DataLoader(TensorDataset(images[keep], labels[keep]), batch_size=20)
    ev = _run(three, loader, eps, "apgd", eps_sweep=[])
    assert [a.name for a in ev.attacks] == ["APGD-CE"] and ev.num_classes == 3


def test_bad_arguments(setup):
    model, loader, eps, images, labels = setup
    pgd = [("PGD", _pgd(model, eps))]
    cases = [
        (dict(norm="l1"), ValueError, "norm must be one of"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(eps=float("nan")), ValueError, "eps must not be NaN"),
        (dict(eps=float("inf")), ValueError, "eps must be finite"),
        (dict(n=0), ValueError, "n must be >= 1"),
        (dict(attacks="cw"), ValueError, "attacks must be one of"),
        (dict(attacks=[]), ValueError, "at least one"),
        (dict(attacks=[("PGD",)]), TypeError, r"attacks\[0\] must be a \(name, attack\) pair"),
        (dict(attacks=[("x", 3)]), TypeError, r"attacks\[0\]"),
        (dict(eps_sweep=[2 * eps, eps]), ValueError, "eps_sweep must be increasing"),
        (dict(eps_sweep=[-1.0]), ValueError, r"eps_sweep\[0\] must be > 0"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(grad_threshold=-0.1), ValueError, "grad_threshold must be >= 0"),
    ]
    for kw, exc, match in cases:
        args = {"eps": eps, "attacks": pgd, **kw}
        with pytest.raises(exc, match=match):
            evaluate(model, loader, progress=False, **args)
    with pytest.raises(ValueError, match=r"images must lie in \[lower, upper\]"):
        evaluate(model, DataLoader(TensorDataset(images + 1, labels)), eps=eps, attacks=pgd, progress=False)
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 4\)"):
        evaluate(model, DataLoader(TensorDataset(images, labels + 4)), eps=eps, attacks=pgd, progress=False)
    with pytest.raises(ValueError, match="loader yielded no images"):
        evaluate(model, DataLoader(TensorDataset(images[:0], labels[:0])), eps=eps, attacks=pgd, progress=False)
    with pytest.raises(ValueError, match="must return adversarial images of shape"):
        evaluate(model, loader, eps=eps, attacks=[("bad", lambda x, y: x[:1])], eps_sweep=[], progress=False)
    with pytest.raises(ValueError, match=r"model must return logits of shape \(B, C\)"):
        evaluate(lambda x: x.sum(), loader, eps=eps, attacks=pgd, progress=False)
