"""AutoAttack: the composition (clean mistakes never attacked, each component on the images still
standing, the first success kept, the report non-increasing), the model left alone, bad input,
and on a small trained digits model robust accuracy no higher than PGD-100's."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from pyadvk import data
from pyadvk.attacks import PGD
from pyadvk.attacks.autoattack import VERSION_COMPONENTS, AutoAttack, AutoAttackReport


def small_model(seed: int = 0, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)]
    if dropout:
        layers.insert(4, nn.Dropout(0.5))
    return nn.Sequential(*layers)


@functools.cache
def trained_digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained for a few seconds on the 8×8 digits, and 40 test images."""
    train, test = data.digits(size=8, split="train"), data.digits(size=8, split="test")
    images, labels = train.tensors
    model = small_model(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), 128):
            batch = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = test.tensors
    return model, x[:40].clone(), y[:40].clone()


def rows_of(batch: torch.Tensor, images: torch.Tensor) -> list[int]:
    """The indices in ``images`` of the rows of ``batch`` (every row must be found once)."""
    match = (batch[:, None] == images[None]).flatten(2).all(2)
    assert (match.sum(1) == 1).all(), "a component received an image that is not one of the batch's"
    return match.float().argmax(1).tolist()


class Spy:
    """A stand-in component: records which images it received, and runs ``attack`` on them."""

    def __init__(self, images: torch.Tensor, attack) -> None:
        self.images = images
        self.attack = attack
        self.received: list[list[int]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.received.append(rows_of(x, self.images))
        return self.attack(x, y)


def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1) == labels


def test_components_see_only_standing_images_and_the_first_success_is_kept(one_thread):
    model = small_model().eval()
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(24, 1, 8, 8, generator=gen)
    labels = model(images).argmax(1).detach()
    labels[:4] = (labels[:4] + 1) % 10  # clean mistakes: never attacked
    eps = 0.08
    weak = Spy(images, PGD(model, eps=eps, alpha=eps / 4, steps=1, random_start=False))
    strong = Spy(images, PGD(model, eps=eps, alpha=eps / 8, steps=20, random_start=False))
    strongest = Spy(images, PGD(model, eps=eps, alpha=eps / 4, steps=50, random_start=False, decay=1.0))
    aa = AutoAttack(model, eps=eps, attacks=["apgd-ce", "apgd-t", "square"])
    aa.components = [("weak", weak), ("strong", strong), ("strongest", strongest)]
    adv = aa(images, labels)

    standing = correct(model, images, labels)
    assert sorted(weak.received[0]) == standing.nonzero().squeeze(1).tolist()
    expected = images.clone()
    for name, spy in (("weak", weak), ("strong", strong), ("strongest", strongest)):
        attacked = standing.nonzero().squeeze(1).tolist()
        if not attacked:
            assert spy.received == []
            continue
        assert len(spy.received) == 1 and sorted(spy.received[0]) == attacked, name
        x_adv = aa.project(spy.attack(images[attacked], labels[attacked]), images[attacked])
        fooled = ~correct(model, x_adv, labels[attacked])
        for j, i in enumerate(attacked):
            if fooled[j]:
                expected[i] = x_adv[j]
                standing[i] = False
        report = next(c for c in aa.report.components if c.name == name)
        assert report.images_attacked == len(attacked) and report.images_broken == int(fooled.sum())
        assert report.robust_accuracy == pytest.approx(float(standing.float().mean()))
    assert torch.equal(adv, expected)
    assert aa.report.robust_accuracy == pytest.approx(float(correct(model, adv, labels).float().mean()))
    assert aa.report.clean_accuracy == pytest.approx(20 / 24)
    steps = [aa.report.clean_accuracy] + [c.robust_accuracy for c in aa.report.components]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert steps[-1] < steps[0], "eps = 0.08 should break some images of an untrained model"


def test_outputs_outside_the_threat_model_are_projected(one_thread):
    """A component that returns images outside the ball and the box cannot count them."""
    model = small_model().eval()
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = model(images).argmax(1).detach()
    for norm, eps in (("linf", 0.05), ("l2", 0.3)):
        aa = AutoAttack(model, norm=norm, eps=eps, attacks=["square"])
        aa.components = [("cheat", lambda x, y: x + 2.0 * torch.randn_like(x))]
        adv = aa(images, labels)
        delta = (adv - images).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1


def test_model_mode_and_parameter_grads_untouched(one_thread):
    model = small_model(dropout=True).train()
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(5)
    aa = AutoAttack(model, eps=0.1, attacks=["apgd-ce"])
    aa.components = [("pgd", PGD(model, eps=0.1, alpha=0.02, steps=5))]
    aa(images, labels)
    assert model.training and model[4].training
    assert all(p.grad is None for p in model.parameters())


def test_fast_modes_reach_every_gradient_component():
    """autocast and channels_last reach the APGD and FAB components (backend and cuda_graph the
    APGD ones, whose fused step they choose)."""
    attack = AutoAttack(
        small_model().eval(), norm="linf", eps=0.1, version="standard", autocast=torch.bfloat16, channels_last=True
    )
    gradient_components = [(name, c) for name, c in attack.components if name != "square"]
    assert {name for name, _ in gradient_components} == {"apgd-ce", "apgd-t", "fab-t"}
    for name, component in gradient_components:
        assert component.autocast == torch.bfloat16 and component.channels_last, name


def test_report_fields_and_text():
    model = small_model().eval()
    images = torch.rand(4, 1, 8, 8)
    labels = model(images).argmax(1).detach()
    aa = AutoAttack(model, eps=0.0)
    adv = aa(images, labels)
    assert torch.equal(adv, images)
    report = aa.report
    assert isinstance(report, AutoAttackReport)
    assert [c.name for c in report.components] == list(VERSION_COMPONENTS["standard"])
    assert all(c.images_attacked == 0 for c in report.components)
    assert report.robust_accuracy == report.clean_accuracy == 1.0
    d = report.to_dict()
    assert d["version"] == "standard" and d["components"][0]["name"] == "apgd-ce"
    assert {"clean_accuracy", "robust_accuracy", "seconds", "notes", "n_images"} <= set(d)
    text = str(report)
    assert "clean accuracy" in text and "after apgd-t:" in text and "robust accuracy" in text


def test_versions_and_fewer_classes():
    model = small_model().eval()
    assert AutoAttack(model, eps=0.1).attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert AutoAttack(model, eps=0.1, version="plus").attacks == (
        "apgd-ce",
        "apgd-dlr",
        "fab",
        "square",
        "apgd-t",
        "fab-t",
    )
    assert AutoAttack(model, eps=0.1, version="rand").attacks == ("apgd-ce", "apgd-dlr")
    five = AutoAttack(model, eps=0.1, n_classes=5)
    assert five.n_target_classes == 4
    three = AutoAttack(model, eps=0.1, n_classes=3, version="plus")
    assert "apgd-t" not in three.attacks and three.skipped == ["apgd-t"]
    binary = AutoAttack(model, eps=0.1, n_classes=2, version="plus")
    assert binary.attacks == ("apgd-ce", "fab", "square", "fab-t") and binary.n_target_classes == 1


def test_fewer_classes_is_said_in_the_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    images = torch.rand(3, 1, 8, 8)
    labels = model(images).argmax(1).detach()
    aa = AutoAttack(model, eps=0.0, n_classes=3)
    aa(images, labels)
    notes = " ".join(aa.report.notes)
    assert "2 target classes (n_classes - 1)" in notes and "apgd-t skipped" in notes


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(eps=0.1, norm="l1"), ValueError, "norm must be one of"),
        (dict(eps=0.1, version="fast"), ValueError, "version must be one of 'standard', 'plus', 'rand'; got 'fast'"),
        (dict(eps=0.1, n_classes=1), ValueError, "n_classes must be >= 2, got 1"),
        (dict(eps=0.1, seed="x"), TypeError, "seed must be an int"),
        (dict(eps=0.1, attacks=["pgd"]), ValueError, "attacks must be one of .*; got 'pgd'"),
        (dict(eps=0.1, attacks="square"), TypeError, "attacks must be a list of component names, got str"),
        (dict(eps=0.1, attacks=["square", "square"]), ValueError, "attacks must not repeat a component"),
        (dict(eps=0.1, attacks=["apgd-t"], n_classes=3), ValueError, "'apgd-t' needs at least 4 classes"),
        (dict(eps=0.1, autocast=torch.float64), ValueError, "autocast must be None"),
        (dict(eps=0.1, lower=1.0, upper=1.0), ValueError, "lower must be < upper"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoAttack(small_model(), **kwargs)


def test_bad_inputs():
    model = small_model().eval()
    images = torch.rand(2, 1, 8, 8)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"images must lie in \[lower, upper\]"):
        AutoAttack(model, eps=0.1)(images * 3, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        AutoAttack(model, eps=0.1)(images, labels[:1])
    with pytest.raises(ValueError, match=r"n_classes must be the model's number of outputs \(10\), got 5"):
        AutoAttack(model, eps=0.1, n_classes=5)(images, labels)
    aa = AutoAttack(model, eps=0.1, attacks=["square"])
    aa.components = [("broken", lambda x, y: x[:1])]
    with pytest.raises(ValueError, match=r"a component returned adversarial images of shape \(1, 1, 8, 8\)"):
        aa(images, model(images).argmax(1).detach())


@pytest.mark.slow
def test_robust_accuracy_no_higher_than_pgd100(one_thread):
    model, images, labels = trained_digits_model()
    eps = 0.1
    pgd = PGD(model, eps=eps, alpha=eps / 10, steps=100)(images, labels)
    pgd_acc = float(correct(model, pgd, labels).float().mean())
    aa = AutoAttack(model, eps=eps)
    adv = aa(images, labels)
    aa_acc = float(correct(model, adv, labels).float().mean())
    assert aa.report.robust_accuracy == pytest.approx(aa_acc)
    assert aa.report.clean_accuracy > 0.85
    assert 0 < pgd_acc < aa.report.clean_accuracy, "pick eps so that PGD-100 breaks some images, not all"
    assert aa_acc <= pgd_acc
    delta = (adv - images).flatten(1).abs().amax(1)
    assert (delta <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
