"""What every attack shares (pyadvk.attacks._common): one input check, the model's state left exactly
as found in train and eval mode, calls under torch.inference_mode(), and normalize=(mean, std)
equal to attacking Normalize ∘ model (issue 13 item 11, issue 15 items 5 and 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyadvk.attacks import APGD, APGDT, FAB, FGSM, PGD, PGDL2, AutoAttack, DeepFool, EnsemblePGD, L2Min, Square
from pyadvk.nn import Normalize

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def gen():
    return torch.Generator().manual_seed(0)


# name -> build(model, **kw) -> run(images, labels) -> adversarial images
ATTACKS = {
    "PGD": lambda m, **kw: PGD(m, eps=0.1, alpha=0.03, steps=3, generator=gen(), **kw),
    "PGDL2": lambda m, **kw: PGDL2(m, eps=0.5, alpha=0.2, steps=3, generator=gen(), **kw),
    "FGSM": lambda m, **kw: FGSM(m, eps=0.05, **kw),
    "EnsemblePGD": lambda m, **kw: EnsemblePGD([m, m], eps=0.1, alpha=0.03, steps=3, generator=gen(), **kw),
    "APGD": lambda m, **kw: APGD(m, eps=0.1, steps=3, **kw),
    "APGDT": lambda m, **kw: APGDT(m, eps=0.1, steps=3, n_target_classes=2, **kw),
    "FAB": lambda m, **kw: FAB(m, eps=0.1, steps=3, n_target_classes=2, **kw),
    "FAB.minimal": lambda m, **kw: _images(FAB(m, norm="l2", steps=3, targeted=False, **kw).minimal),
    "DeepFool.minimal": lambda m, **kw: _images(DeepFool(m, steps=3, **kw).minimal),
    "Square": lambda m, **kw: Square(m, eps=0.1, n_queries=20, **kw),
    "AutoAttack": lambda m, **kw: AutoAttack(m, eps=0.3, attacks=["apgd-ce", "square"], **kw),
    "L2Min": lambda m, **kw: _images(L2Min(m, steps=5, budget=2.0, **kw)),
}


def _images(run):
    return lambda images, labels: run(images, labels).images


def bn_model(seed=0):
    """A model with state: batch norm (running statistics, num_batches_tracked) and dropout."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 4, 4, generator=g), torch.tensor([1, 5, 9])


def snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = [m.training for m in model.modules()]
    return state, modes


def assert_same_state(model: nn.Module, before):
    state, modes = snapshot(model)
    assert list(state) == list(before[0])
    for name, value in state.items():
        assert torch.equal(value, before[0][name]), f"{name} changed"
    assert modes == before[1]
    assert all(p.grad is None for p in model.parameters())


def test_the_model_has_state_a_forward_pass_changes(data):
    """The control: in train mode one plain forward pass changes this model's buffers."""
    model = bn_model().train()
    before = snapshot(model)
    model(data[0])
    with pytest.raises(AssertionError, match="running_mean changed"):
        assert_same_state(model, before)


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("train", [True, False])
def test_attack_leaves_the_model_state_as_found(name, train, data):
    images, labels = data
    model = bn_model().train(train)
    model[3].eval()  # one submodule in the other mode: every flag must come back as it was
    before = snapshot(model)
    adv = ATTACKS[name](model)(images, labels)
    assert adv.shape == images.shape
    assert_same_state(model, before)


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_restores_the_state_when_it_fails(name, data):
    images, labels = data
    model = bn_model().train()

    def failing(x):  # the pass updates the statistics, then the model fails
        model(x)
        raise RuntimeError("model failed")

    holder = nn.Sequential(model)  # so that the attack can see the state through a module
    holder.forward = failing  # type: ignore[method-assign]
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="model failed"):
        ATTACKS[name](holder)(images, labels)
    assert_same_state(model, before)


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_under_inference_mode(name, data):
    images, labels = data
    model = bn_model().eval()
    expected = ATTACKS[name](model)(images, labels)
    with torch.inference_mode():
        x, y = images.clone(), labels.clone()  # inference tensors, as in Lightning's validate
        adv = ATTACKS[name](model)(x, y)
    assert not adv.is_inference()
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)


def test_pgd_and_autoattack_under_inference_mode_in_train_mode(data):
    images, labels = data
    model = bn_model().train()
    before = snapshot(model)
    with torch.inference_mode():
        adv = PGD(model, eps=0.1, alpha=0.03, steps=3)(images, labels)
        aa = AutoAttack(model, eps=0.1, version="standard", seed=0)
        adv_aa = aa(images, labels)
    assert (adv - images).abs().max() <= 0.1 + 1e-6 and (adv_aa - images).abs().max() <= 0.1 + 1e-6
    assert [c.name for c in aa.report.components] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert_same_state(model, before)


@pytest.mark.parametrize("name", ATTACKS)
def test_normalize_option_equals_attacking_normalize_then_model(name, data):
    images, labels = data
    model = bn_model().eval()
    composed = ATTACKS[name](nn.Sequential(Normalize(MEAN, STD), model))(images, labels)
    option = ATTACKS[name](model, normalize=(MEAN, STD))(images, labels)
    module = ATTACKS[name](model, normalize=Normalize(MEAN, STD))(images, labels)
    torch.testing.assert_close(option, composed, rtol=0, atol=0)
    torch.testing.assert_close(module, composed, rtol=0, atol=0)
    assert option.min() >= 0 and option.max() <= 1  # pixel space


def test_normalize_keeps_eps_in_pixel_space(data):
    images, labels = data
    model = bn_model().eval()
    for norm, eps in [("linf", 0.05), ("l2", 0.3)]:
        adv = PGD(model, eps=eps, alpha=eps / 2, steps=4, norm=norm, normalize=(MEAN, STD))(images, labels)
        delta = (adv - images).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-6).all() and (size > eps / 2).all()
    attack = PGD(model, normalize=(MEAN, STD))
    assert isinstance(attack.model[0], Normalize) and attack.model[1] is model
    assert "normalize=Normalize(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))" in repr(attack)
    with pytest.raises(TypeError, match="normalize must be None, a pyadvk.nn.Normalize or a"):
        PGD(model, normalize=[0.5])
    with pytest.raises(
        ValueError, match=r"Normalize expects input of shape \(B, 2, \.\.\.\).*got shape \(3, 3, 4, 4\)"
    ):
        PGD(model, normalize=((0.5, 0.5), (0.2, 0.2)))(images, labels)


def test_normalize_matches_torchattacks_set_normalization_used(data):
    torchattacks = pytest.importorskip("torchattacks")
    images, labels = data
    model = bn_model().eval()
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    theirs.set_normalization_used(mean=list(MEAN), std=list(STD))
    ours = PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, normalize=(MEAN, STD))
    # torchattacks 3.5 takes and returns normalized images and attacks their pixels
    norm = Normalize(MEAN, STD)
    expected = norm.denormalize(theirs(norm(images), labels))
    torch.testing.assert_close(ours(images, labels), expected, rtol=0, atol=2e-6)


BAD_INPUTS = [
    (lambda x, y: (x + 1.0, y), ValueError, r"images must lie in \[lower, upper\] = \[0.0, 1.0\]"),
    (lambda x, y: (x * float("nan"), y), ValueError, r"images must lie in \[lower, upper\]"),
    (lambda x, y: ((x * 255).long(), y), TypeError, "images must be float32, float16 or bfloat16"),
    (lambda x, y: (x.tolist(), y), TypeError, "images must be a torch.Tensor"),
    (lambda x, y: (x, y.float()), TypeError, "labels must be an integer tensor of class indices"),
    (lambda x, y: (x, y.bool()), TypeError, "labels must be an integer tensor of class indices"),
    (lambda x, y: (x, y.tolist()), TypeError, "labels must be an integer tensor"),
    (lambda x, y: (x, y[:2]), ValueError, r"labels must have shape \(3,\)"),
    (lambda x, y: (x, y[:, None]), ValueError, r"labels must have shape \(3,\)"),
    (lambda x, y: (x, y + 1), ValueError, r"labels must be class indices in \[0, 10\).*got values in \[2, 10\]"),
    (lambda x, y: (x, y - 2), ValueError, r"labels must be class indices in \[0, 10\).*got values in \[-1, 7\]"),
]


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("bad, error, match", BAD_INPUTS)
def test_one_input_check_for_every_attack(name, bad, error, match, data):
    model = bn_model().eval()
    images, labels = bad(*data)
    with pytest.raises(error, match=match):
        ATTACKS[name](model)(images, labels)


@pytest.mark.parametrize("name", ATTACKS)
def test_every_integer_label_dtype(name, data):
    images, labels = data
    model = bn_model().eval()
    expected = ATTACKS[name](model)(images, labels)
    for dtype in (torch.int32, torch.uint8):
        torch.testing.assert_close(ATTACKS[name](model)(images, labels.to(dtype)), expected, rtol=0, atol=0)
