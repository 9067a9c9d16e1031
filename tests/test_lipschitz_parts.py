"""Modules that describe their forward to lipschitz_bound (``lipschitz_parts()`` returning a
LipschitzParts): the rule on a user's module, the zoo's descriptions against their own forward,
and the errors for a bad description."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyadvk import models
from pyadvk.lipschitz import LipschitzParts, lipschitz_bound, spectral_norms

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """``out(fc2(act(fc1(x))) + skip(x))``: a residual block no rule of the library knows by class."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 7), nn.ReLU(), nn.Linear(7, width)
        self.skip = nn.Linear(width, width)
        self.out = nn.LeakyReLU(negative_slope=2.0)  # Lipschitz constant 2

    def forward(self, x):
        return self.out(self.fc2(self.act(self.fc1(x))) + self.skip(x))

    def lipschitz_parts(self):
        return LipschitzParts(branch=("fc1", "act", "fc2"), shortcut="skip", activation="out")


def test_residual_rule_on_a_users_module():
    """L(out) · (L(fc1) L(act) L(fc2) + L(skip)), and an upper bound of what the function does."""
    torch.manual_seed(0)
    block = Residual()
    norms = spectral_norms(block, (5,), "gram", 8)
    expected = 2.0 * (float(norms["fc1"]) * float(norms["fc2"]) + float(norms["skip"]))
    got = float(lipschitz_bound(block, (5,), "gram", 8))
    assert abs(got - expected) <= 1e-6 * expected
    x, y = torch.randn(2, 256, 5).unbind(0)
    with torch.no_grad():
        ratios = (block(x) - block(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert float(ratios.max()) <= got


def test_composition_without_shortcut_is_the_product():
    """shortcut=None and activation=None: the bound of the same children in an nn.Sequential."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.act, self.second = nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)

        def forward(self, x):
            return self.second(self.act(self.first(x)))

        def lipschitz_parts(self):
            return LipschitzParts(branch=("first", "act", "second"))

    torch.manual_seed(1)
    chain = Chain()
    seq = nn.Sequential(copy.deepcopy(chain.first), nn.Tanh(), copy.deepcopy(chain.second))
    assert torch.equal(lipschitz_bound(chain, (4,), "gram", 6), lipschitz_bound(seq, (4,), "gram", 6))


def _described(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward that ``module.lipschitz_parts()`` describes, evaluated (children recursively);
    a Linear after a spatial tensor gets it flattened (ResNet's flatten between pool and fc, which
    moves no value)."""
    if not hasattr(module, "lipschitz_parts"):
        if isinstance(module, nn.Linear) and x.dim() > 2:
            x = torch.flatten(x, 1)
        return module(x)
    branch, shortcut, activation = module.lipschitz_parts()
    out = x
    for name in branch:
        out = _described(getattr(module, name), out)
    if shortcut is not None:
        out = out + _described(getattr(module, shortcut), x)
    return out if activation is None else _described(getattr(module, activation), out)


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: models.BasicBlock(4, 4, 1, "relu"), (4, 6, 6)),
        (lambda: models.BasicBlock(4, 6, 2, "half_huber"), (4, 6, 6)),
        (lambda: models.Bottleneck(8, 2, 1, "relu"), (8, 5, 5)),
        (lambda: models.Bottleneck(4, 2, 2, "half_huber"), (4, 5, 5)),
        (lambda: models.SmallCNN(in_channels=1, input_size=8, width=4), (1, 8, 8)),
        (lambda: models.resnet18(num_classes=3), (3, 8, 8)),
    ],
    ids=["basic", "basic-shortcut", "bottleneck", "bottleneck-shortcut", "small_cnn", "resnet18"],
)
def test_zoo_descriptions_match_their_forward(build, shape):
    """Each model of pyadvk.models computes exactly the forward its lipschitz_parts() describes
    (so the bound's rule applies to it), and the bound is finite and positive."""
    torch.manual_seed(2)
    model = build().eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(_described(model, x), model(x))
    bound = float(lipschitz_bound(model, shape, "reshaped", 2, generator=torch.Generator().manual_seed(0)))
    assert 0 < bound < float("inf")


class _Described(nn.Module):
    def __init__(self, parts):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = 2.0
        self.parts = parts

    def forward(self, x):
        return self.fc(x)

    def lipschitz_parts(self):
        return self.parts


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            "fc",
            r"lipschitz_parts\(\) of module '\(model\)' \(_Described\) must return a pyadvk.lipschitz.LipschitzParts",
        ),
        ((("fc",), None), r"must return a pyadvk.lipschitz.LipschitzParts.* got \(\('fc',\), None\)"),
        (("fc", None, None), r"must return .*a sequence of child names"),
        (((1,), None, None), r"must return .*a sequence of child names"),
        ((("fc",), 3, None), r"then a name or None twice"),
        (LipschitzParts(("fc", "nope")), r"names 'nope', which is not a child module of it \(got NoneType\)"),
        (
            LipschitzParts(("fc",), activation="scale"),
            r"names 'scale', which is not a child module of it \(got float\)",
        ),
    ],
)
def test_bad_descriptions_are_refused(parts, message):
    with pytest.raises(TypeError, match=message):
        lipschitz_bound(_Described(parts), (3,), "gram", 2)


def test_a_bad_description_inside_a_model_is_named():
    model = nn.Sequential(nn.Linear(3, 3), _Described(LipschitzParts(("missing",))))
    with pytest.raises(TypeError, match=r"module '1' \(_Described\) names 'missing'"):
        lipschitz_bound(model, (3,), "gram", 2)
