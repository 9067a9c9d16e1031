"""EnsemblePGD: the ensemble loss, agreement with PGD for one model, transfer to every member,
the eps-ball, modes and gradients left alone, and every bad argument."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyadvk.attacks import PGD, EnsemblePGD
from pyadvk.attacks.ensemble import ensemble_log_prob
from pyadvk.data import digits
from pyadvk.ops import pgd as pgd_ops
from tests.conftest import available

BACKENDS = available(pgd_ops.STEP, "cpu")


def small_model(seed=0, classes=10, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, classes)]
    if batchnorm:
        layers.insert(1, nn.BatchNorm2d(8))
    return nn.Sequential(*layers)


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def test_ensemble_log_prob_is_log_of_the_weighted_mixture():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=gen) * 3 for _ in range(3)]
    weights = torch.tensor([0.2, 0.5, 0.3])
    labels = torch.randint(0, 7, (5,), generator=gen)
    mixture = sum(w * torch.softmax(z.double(), 1) for w, z in zip(weights.double(), logits))
    expected = torch.log(mixture[torch.arange(5), labels]).float()
    torch.testing.assert_close(ensemble_log_prob(logits, weights.log(), labels), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, eps, alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
@pytest.mark.parametrize("targeted", [False, True])
def test_single_model_equals_pgd(backend, norm, eps, alpha, targeted, data):
    # One model: −log softmax(f(x))[y] averaged over the batch is PGD's cross-entropy.
    images, labels = data
    model = small_model().eval()
    kwargs = dict(eps=eps, alpha=alpha, steps=5, norm=norm, targeted=targeted, backend=backend)
    ours = EnsemblePGD([model], generator=torch.Generator().manual_seed(3), **kwargs)(images, labels)
    pgd = PGD(model, generator=torch.Generator().manual_seed(3), **kwargs)(images, labels)
    torch.testing.assert_close(ours, pgd, rtol=0, atol=0)


def test_zero_weight_ignores_a_model_and_weights_are_normalized(data):
    images, labels = data
    a, b = small_model(0).eval(), small_model(1).eval()
    kwargs = dict(eps=8 / 255, alpha=2 / 255, steps=4, random_start=False)
    only_a = EnsemblePGD([a, b], weights=[1.0, 0.0], **kwargs)(images, labels)
    torch.testing.assert_close(only_a, PGD(a, **kwargs)(images, labels), rtol=0, atol=0)
    uniform = EnsemblePGD([a, b], **kwargs)(images, labels)
    scaled = EnsemblePGD([a, b], weights=torch.tensor([2.5, 2.5]), **kwargs)(images, labels)
    torch.testing.assert_close(uniform, scaled, rtol=0, atol=0)
    assert EnsemblePGD([a, b], weights=[1, 3], **kwargs).weights.tolist() == [0.25, 0.75]


@pytest.mark.parametrize("targeted", [False, True])
def test_one_step_follows_the_sign_of_the_mixture_gradient(targeted, data):
    images, labels = data
    models = [small_model(s).eval() for s in range(3)]
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    alpha = 0.01
    adv = EnsemblePGD(
        models,
        weights=weights.tolist(),
        eps=0.05,
        alpha=alpha,
        steps=1,
        random_start=False,
        targeted=targeted,
        backend="torch",
    )(images, labels)
    x = images.double().requires_grad_(True)
    mixture = sum(w * torch.softmax(copy.deepcopy(m).double()(x), 1) for w, m in zip(weights, models))
    loss = -torch.log(mixture[torch.arange(len(labels)), labels]).mean()
    (grad,) = torch.autograd.grad(-loss if targeted else loss, x)
    expected = (images + alpha * grad.sign().float()).clamp(0, 1)
    nonzero = grad.abs() > 1e-12
    torch.testing.assert_close(adv[nonzero], expected[nonzero], rtol=0, atol=1e-7)


@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 0.4)])
def test_stays_in_the_ball_and_the_box(norm, eps, data):
    images, labels = data
    models = [small_model(s).eval() for s in range(2)]
    adv = EnsemblePGD(models, eps=eps, alpha=eps / 3, steps=6, norm=norm)(images, labels)
    delta = (adv - images).reshape(len(images), -1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size
    assert adv.min() >= 0 and adv.max() <= 1
    assert (size > 0).all()


def test_models_run_in_eval_mode_and_modes_and_grads_are_left_alone(data):
    images, labels = data
    a, b = small_model(0, batchnorm=True), small_model(1)
    a.train()
    b.eval()
    a[0].eval()  # a mixed-mode model must be restored module by module
    seen = []
    a.register_forward_hook(lambda m, i, o: seen.append(m.training))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    EnsemblePGD([a, b], eps=0.03, alpha=0.01, steps=3)(images, labels)
    assert seen and not any(seen)
    assert a.training and a[1].training and not a[0].training and not b.training
    for k, v in a.state_dict().items():  # batch-norm running statistics untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for m in (a, b) for p in m.parameters())


def test_modes_are_restored_when_the_attack_fails(data):
    images, labels = data
    a, b = small_model(0).train(), small_model(1, classes=5).train()
    with pytest.raises(ValueError, match="same number of classes"):
        EnsemblePGD([a, b], eps=0.03, alpha=0.01, steps=2)(images, labels % 5)
    assert a.training and b.training


def _train(seed: int, model: nn.Module, images, labels, steps=100) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):  # full batch
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digit_models():
    """Two different architectures trained on the 8×8 digits (they transfer poorly to each other)."""
    train_x, train_y = digits(8, "train").tensors
    torch.manual_seed(0)
    a = _train(0, nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), train_x, train_y)
    b = _train(
        1,
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        ),
        train_x,
        train_y,
    )
    return a, b


@pytest.mark.parametrize("targeted", [False, True])
def test_ensemble_fools_both_models_more_than_attacking_one(targeted, digit_models):
    # The ensemble's images fool both models far more often than those made against either alone.
    a, b = digit_models
    test_x, test_y = digits(8, "test").tensors
    with torch.no_grad():
        right = (a(test_x).argmax(1) == test_y) & (b(test_x).argmax(1) == test_y)
    assert right.float().mean() > 0.9
    x, y = test_x[right], test_y[right]
    labels = (y + 1) % 10 if targeted else y
    kwargs = dict(eps=0.15, alpha=0.15 / 4, steps=10, random_start=False, targeted=targeted)

    def fools_both(adv):
        with torch.no_grad():
            pa, pb = a(adv).argmax(1), b(adv).argmax(1)
        hit = ((pa == labels) & (pb == labels)) if targeted else ((pa != y) & (pb != y))
        return hit.float().mean().item()

    ensemble = fools_both(EnsemblePGD([a, b], **kwargs)(x, labels))
    alone = max(fools_both(PGD(m, **kwargs)(x, labels)) for m in (a, b))
    assert ensemble > alone + 0.08, (ensemble, alone)


def test_empty_batch_gives_an_empty_result():
    out = EnsemblePGD([small_model()], eps=0.1, alpha=0.1, steps=2)(
        torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.int64)
    )
    assert out.shape == (0, 3, 8, 8)


@pytest.mark.parametrize(
    "models, kwargs, error, match",
    [
        ([], {}, ValueError, "at least one model"),
        ("model", {}, TypeError, "models must be a list"),
        ("module", {}, TypeError, "models must be a list"),
        ([3], {}, TypeError, r"models\[0\] must be callable"),
        ("two", {"weights": [1.0]}, ValueError, "one weight per model \\(2\\), got 1"),
        ("two", {"weights": [1.0, -0.5]}, ValueError, r"weights\[1\] must be a finite number >= 0, got -0.5"),
        ("two", {"weights": [1.0, float("nan")]}, ValueError, r"weights\[1\] must not be NaN"),
        ("two", {"weights": [0.0, 0.0]}, ValueError, "must not all be zero"),
        ("two", {"weights": torch.tensor([[1.0, 1.0]])}, ValueError, "1-D floating tensor"),
        ("two", {"weights": torch.tensor([1.0, float("inf")])}, ValueError, r"weights\[1\] must be a finite"),
        ("two", {"weights": "ab"}, TypeError, "weights must be a sequence"),
        ("two", {"eps": -0.1}, ValueError, "eps must be >= 0.0, got -0.1"),
        ("two", {"alpha": 0.0}, ValueError, "alpha must be > 0.0, got 0.0"),
        ("two", {"steps": -1}, ValueError, "steps must be >= 0, got -1"),
        ("two", {"norm": "l1"}, ValueError, "norm must be one of 'linf', 'l2'; got 'l1'"),
        ("two", {"lower": 1.0, "upper": 0.0}, ValueError, "lower must be < upper"),
    ],
)
def test_bad_arguments(models, kwargs, error, match):
    if models == "two":
        models = [small_model(0), small_model(1)]
    elif models == "module":
        models = small_model(0)
    args = dict(eps=0.03, alpha=0.01, steps=2) | kwargs
    with pytest.raises(error, match=match):
        EnsemblePGD(models, **args)


def test_bad_call_arguments(data):
    images, labels = data
    attack = EnsemblePGD([small_model(0), small_model(1)], eps=0.03, alpha=0.01, steps=2)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        attack(images, labels + 10)
    with pytest.raises(ValueError, match="images must lie in"):
        attack(images + 2, labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        attack(images, labels.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        attack(images, labels[:3])


@pytest.mark.gpu
def test_cuda_matches_cpu(data):
    images, labels = data
    models = [small_model(s).eval() for s in range(2)]
    kwargs = dict(eps=8 / 255, alpha=2 / 255, steps=5, random_start=False, weights=[0.3, 0.7])
    cpu = EnsemblePGD(models, backend="torch", **kwargs)(images, labels)
    gpu = EnsemblePGD([copy.deepcopy(m).cuda() for m in models], **kwargs)(images.cuda(), labels.cuda())
    agree = (gpu.cpu() - cpu).abs() <= 1e-6
    assert agree.float().mean() > 0.99  # sign steps may flip where a gradient entry is ~0
