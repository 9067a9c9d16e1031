"""Square Attack: inside the ball and the box, never a gradient, seeded, the L2 radius kept, the
exact answer on a linear model, query accounting, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyadvk.attacks.square import Square, centred_pattern, meta_pattern, p_schedule


def small_model(seed: int = 0, channels: int = 3, side: int = 8, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * side * side, classes),
    )


def predictions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1)


class Unbreakable(nn.Module):
    """A linear binary model ``z = (0, w·x + b)`` whose class 1 survives any perturbation of the
    test's size (b is large): the attack can only lower the margin, never break an image."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) * self.w.flatten()).sum(1) + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("Square read a gradient")


class GradientSpy(nn.Module):
    """Records every query's batch size and fails the test if a gradient could flow."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "Square queried the model with gradients enabled"
        assert not x.requires_grad, "Square queried the model on an input that requires grad"
        self.batches.append(x.shape[0])
        return self.inner(NoBackward.apply(x))


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("linf", 0.3), ("l2", 0.5), ("l2", 3.0)])
@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (1, 2, 7, 9)])
def test_inside_ball_and_box(norm, eps, shape, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(shape[1], 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )
    images = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    images[:, :, 0, 0] = 0.0  # pixels on the box's faces
    images[:, :, -1, -1] = 1.0
    labels = predictions(model, images)
    adv = Square(model, norm=norm, eps=eps, n_queries=60)(images, labels)
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_never_reads_a_gradient(norm, one_thread):
    spy = GradientSpy(small_model()).train()
    images = torch.rand(4, 3, 8, 8)
    labels = predictions(spy.inner, images)
    Square(spy, norm=norm, eps=0.1 if norm == "linf" else 1.0, n_queries=30)(images, labels)
    assert spy.batches, "the model was never queried"
    assert spy.training and spy.inner.training  # mode left as set
    assert all(p.grad is None for p in spy.parameters())


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_seeded_reproducible(norm, eps, one_thread):
    model = small_model().eval()
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = predictions(model, images)
    first = Square(model, norm=norm, eps=eps, n_queries=40, seed=7)(images, labels)
    again = Square(model, norm=norm, eps=eps, n_queries=40, seed=7)(images, labels)
    other = Square(model, norm=norm, eps=eps, n_queries=40, seed=8)(images, labels)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_l2_norm_is_eps_off_the_box(one_thread):
    """Away from the box's faces the L2 perturbation has norm eps after the initialization and
    after every accepted update (the mass of W1 ∪ W2 is moved, not lost)."""
    gen = torch.Generator().manual_seed(4)
    images = 0.3 + 0.4 * torch.rand(3, 3, 16, 16, generator=gen)
    model = Unbreakable(torch.randn(3, 16, 16, generator=gen), b=1e4)
    labels = torch.ones(3, dtype=torch.int64)
    eps = 0.8
    attack = Square(model, norm="l2", eps=eps, n_queries=300)
    adv = attack(images, labels)
    delta = adv - images
    assert delta.abs().max() < 0.3  # the box was never active
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((3,), eps), rtol=1e-5, atol=0)
    # and the search moved: the margin is below the initialization's
    init_only = Square(model, norm="l2", eps=eps, n_queries=1)(images, labels)
    with torch.no_grad():
        assert (model(adv)[:, 1] < model(init_only)[:, 1]).all()
    assert torch.equal(attack.queries, torch.full((3,), 300))


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_linf_exact_on_a_linear_binary_model(loss, one_thread):
    """The margin of a linear binary model is minimized over the L∞ ball at the vertex
    x − ε·sign(w) (box inactive): with generous queries Square finds exactly that vertex. The
    bias leaves a margin of at least 1 there, so nothing breaks and the cross-entropy is not
    saturated in float32 (it would be at a margin of 100)."""
    gen = torch.Generator().manual_seed(5)
    images = 0.3 + 0.4 * torch.rand(2, 1, 8, 8, generator=gen)
    w = torch.randn(1, 8, 8, generator=gen)
    eps = 0.1
    b = 1.0 - float((images.flatten(1) @ w.flatten()).min()) + eps * float(w.abs().sum())
    model = Unbreakable(w, b=b)
    labels = torch.ones(2, dtype=torch.int64)
    adv = Square(model, norm="linf", eps=eps, n_queries=3000, loss=loss)(images, labels)
    exact = images - eps * torch.sign(w)
    assert torch.equal(adv, exact)
    with torch.no_grad():
        margin = model(adv)[:, 1]
        closed_form = model(images)[:, 1] - eps * w.abs().sum()
    torch.testing.assert_close(margin, closed_form, rtol=1e-6, atol=1e-4)


def test_only_standing_images_are_queried(one_thread):
    spy = GradientSpy(small_model()).eval()
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    clean = predictions(spy.inner, images)
    labels = clean.clone()
    labels[:2] = (clean[:2] + 1) % 10  # misclassified from the start: never attacked
    attack = Square(spy, norm="linf", eps=0.2, n_queries=200, restarts=2)
    adv = attack(images, labels)
    assert torch.equal(adv[:2], images[:2])
    assert attack.queries[:2].tolist() == [0, 0]
    # every query after the clean check is one image's evaluation, counted once
    assert spy.batches[0] == 8
    assert sum(spy.batches[1:]) == int(attack.queries.sum())
    broken = predictions(spy.inner, adv) != labels
    assert broken[2:].any(), "eps = 0.2 should break some images of an untrained model"
    # a broken image stops costing queries; a standing one used its full budget in every restart
    standing = ~broken[2:]
    assert (attack.queries[2:][standing] == 2 * 200).all()
    assert (attack.queries[2:][~standing] <= 2 * 200).all()
    assert max(spy.batches[1:]) <= 6


def test_eps_zero_and_empty_batch():
    model = small_model().eval()
    images = torch.rand(3, 3, 8, 8)
    labels = predictions(model, images)
    assert torch.equal(Square(model, eps=0.0, n_queries=10)(images, labels), images)
    empty = Square(model, eps=0.1)(images[:0], labels[:0])
    assert empty.shape == (0, 3, 8, 8)


def test_p_schedule():
    assert p_schedule(10, 10000, 0.8) == 0.8
    assert p_schedule(11, 10000, 0.8) == 0.4
    assert p_schedule(9999, 10000, 0.8) == 0.8 / 2**9
    # rescaled: at 1,000 queries iteration 2 is the paper's 20, past the first halving
    assert p_schedule(1, 1000, 0.8) == 0.8
    assert p_schedule(2, 1000, 0.8) == 0.4
    assert p_schedule(101, 1000, 0.5) == 0.5 / 2**5


def test_patterns():
    eta = centred_pattern(5, 5)
    # n = 2: ring values 1/9, 1/9 + 1/4, 1/9 + 1/4 + 1 from the border inwards
    assert eta[0, 0] == pytest.approx(1 / 9) and eta[1, 1] == pytest.approx(1 / 9 + 1 / 4)
    assert eta[2, 2] == pytest.approx(1 / 9 + 1 / 4 + 1)
    assert torch.equal(eta, eta.T) and torch.equal(eta, eta.flip(0))
    meta = meta_pattern(6)
    assert meta.norm() == pytest.approx(1.0)
    assert (meta[:, :3] > 0).all() and (meta[:, 3:] < 0).all()
    assert meta_pattern(1).shape == (1, 1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eps=-0.1), ValueError, "eps must be >= 0"),
        (dict(eps="big"), TypeError, "eps must be a real number"),
        (dict(eps=0.1, norm="l1"), ValueError, "norm must be one of"),
        (dict(eps=0.1, n_queries=0), ValueError, "n_queries must be >= 1, got 0"),
        (dict(eps=0.1, p_init=1.5), ValueError, r"p_init must be in \(0, 1\], got 1.5"),
        (dict(eps=0.1, p_init=0.0), ValueError, "p_init must be > 0"),
        (dict(eps=0.1, restarts=0), ValueError, "restarts must be >= 1, got 0"),
        (dict(eps=0.1, loss="hinge"), ValueError, "loss must be one of 'margin', 'ce'; got 'hinge'"),
        (dict(eps=0.1, seed=1.5), TypeError, "seed must be an int"),
        (dict(eps=0.1, lower=1.0, upper=0.0), ValueError, "lower must be < upper"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Square(small_model(), **kwargs)


def test_bad_inputs():
    model = small_model().eval()
    attack = Square(model, eps=0.1, n_queries=5)
    images = torch.rand(2, 3, 8, 8)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="images must be 4-D"):
        attack(images.flatten(1), labels)
    with pytest.raises(ValueError, match=r"images must lie in \[lower, upper\]"):
        attack(images + 1.0, labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        attack(images, labels.float())
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        attack(images, labels + 10)
    with pytest.raises(ValueError, match=r"model must return logits of shape \(2, C\)"):
        Square(lambda x: x, eps=0.1)(images, labels)
