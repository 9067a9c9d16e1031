"""pyadvk.nn.Normalize and the normalize= option of attacks, metrics and explanations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyadvk.nn import IMAGENET_MEAN, IMAGENET_STD, Normalize, with_normalization


def test_normalize_per_channel():
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(2, 3, 5, 4)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std, rtol=0, atol=0)
    torch.testing.assert_close(norm.denormalize(norm(x)), x)
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm.mean.dtype == torch.float32 and norm.mean.shape == (3,)
    assert "mean=(0.485, 0.456, 0.406)" in repr(norm)


def test_normalize_scalar_broadcasts_and_keeps_dtype_and_layout():
    norm = Normalize(0.5, (0.25, 0.5))
    assert norm.channels == 2 and norm.mean.tolist() == [0.5, 0.5]
    single = Normalize(0.5, 0.5)
    assert single.channels is None
    for shape in [(3, 1), (3, 4, 6), (2, 7, 3, 3)]:
        x = torch.rand(shape)
        torch.testing.assert_close(single(x), (x - 0.5) / 0.5)
    x = torch.rand(2, 2, 4, 4).contiguous(memory_format=torch.channels_last).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "mean, std, error, match",
    [
        ((0.5, 0.5), (0.2, 0.2, 0.2), ValueError, "one value per channel each"),
        ((0.5,), (0.0,), ValueError, "std must be > 0"),
        ((0.5,), (-1.0,), ValueError, "std must be > 0"),
        ((float("nan"),), (1.0,), ValueError, "mean must be finite"),
        ((0.5,), (float("inf"),), ValueError, "std must be finite"),
        ((), (1.0,), ValueError, "mean must hold at least one value"),
        ("abc", (1.0,), TypeError, "mean must be a number"),
        ((0.5, "a"), (1.0, 1.0), TypeError, r"mean\[1\] must be a real number"),
        (torch.zeros(2, 2), 1.0, ValueError, "1-D real tensor"),
    ],
)
def test_normalize_rejects_bad_arguments(mean, std, error, match):
    with pytest.raises(error, match=match):
        Normalize(mean, std)


def test_normalize_rejects_wrong_channels():
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"shape \(B, 3, \.\.\.\).*got shape \(2, 1, 4, 4\)"):
        norm(torch.rand(2, 1, 4, 4))
    with pytest.raises(TypeError, match="input must be a floating tensor"):
        norm(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_with_normalization():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    assert with_normalization(model, None) is model
    wrapped = with_normalization(model, ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5)))
    assert isinstance(wrapped, nn.Sequential) and wrapped[1] is model
    x = torch.rand(2, 3, 2, 2)
    torch.testing.assert_close(wrapped(x), model(Normalize((0.1, 0.2, 0.3), 0.5)(x)))
    module = Normalize(0.5, 0.25)
    assert with_normalization(model, module)[0] is module
    function = with_normalization(lambda x: x.flatten(1), (0.5, 0.25))
    torch.testing.assert_close(function(x), ((x - 0.5) / 0.25).flatten(1))
    with pytest.raises(TypeError, match=r"normalize must be None, a pyadvk.nn.Normalize or a \(mean, std\) pair"):
        with_normalization(model, (0.5,))


# -- the normalize= option of metrics and explanations, and their care of the model's state -------


def _model(seed=0):
    """3-channel 4×4 images, 10 classes, with batch-norm state."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture
def loader():
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.rand(6, 3, 4, 4, generator=g), torch.randint(0, 10, (6,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _state(model):
    return [v.clone() for v in model.state_dict().values()], [m.training for m in model.modules()]


def _assert_state(model, before):
    values, modes = _state(model)
    assert all(torch.equal(a, b) for a, b in zip(values, before[0])) and modes == before[1]


def test_metrics_normalize_equals_the_composed_model(loader, one_thread):
    from pyadvk.attacks import PGD
    from pyadvk.metrics import ara, evaluate, robust_accuracy, robustness_curve

    model = _model().eval()
    composed = nn.Sequential(Normalize(MEAN, STD), model)
    kw = dict(eps=0.05, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(0))
    acc_option = robust_accuracy(model, loader, PGD(model, normalize=(MEAN, STD), **kw), normalize=(MEAN, STD))
    kw["generator"] = torch.Generator().manual_seed(0)
    assert acc_option == robust_accuracy(composed, loader, PGD(composed, **kw))
    with pytest.raises(ValueError, match="attack PGD was built on the model without normalization"):
        robust_accuracy(model, loader, PGD(model, steps=1), normalize=(MEAN, STD))

    curve = dict(eps_list=[0.0, 0.05, 0.2], steps=2, progress=False)
    a = robustness_curve(model, loader, generator=torch.Generator().manual_seed(1), normalize=(MEAN, STD), **curve)
    b = robustness_curve(composed, loader, generator=torch.Generator().manual_seed(1), **curve)
    assert a.accuracy == b.accuracy

    kw_ara = dict(n=5, steps=6, budget=2.0, fab_steps=3, progress=False)
    r1, r2 = ara(model, loader, normalize=(MEAN, STD), **kw_ara), ara(composed, loader, **kw_ara)
    assert torch.equal(r1.distances, r2.distances) and r1.ara == r2.ara

    kw_eval = dict(eps=0.05, attacks="pgd", steps=2, eps_sweep=[], progress=False)
    e1, e2 = evaluate(model, loader, normalize=(MEAN, STD), **kw_eval), evaluate(composed, loader, **kw_eval)
    assert e1.robust_accuracy == e2.robust_accuracy and torch.equal(e1.broken_by, e2.broken_by)
    with pytest.raises(ValueError, match="was built on the model without normalization"):
        evaluate(model, loader, eps=0.05, attacks=[("pgd", PGD(model, steps=1))], normalize=(MEAN, STD))


def test_explain_normalize_equals_the_composed_model(one_thread):
    from pyadvk.explain import adversarial_explanation, saliency

    model = _model().eval()
    composed = nn.Sequential(Normalize(MEAN, STD), model)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    e1 = adversarial_explanation(model, x, [1, 2], steps=4, normalize=(MEAN, STD))
    e2 = adversarial_explanation(composed, x, [1, 2], steps=4)
    assert torch.equal(e1.adversarial, e2.adversarial) and e1.adversarial.min() >= 0
    assert torch.equal(saliency(model, x, normalize=(MEAN, STD)), saliency(composed, x))


def test_metrics_and_explanations_leave_the_model_state_as_found(loader, one_thread):
    from pyadvk.explain import adversarial_explanation, saliency
    from pyadvk.metrics import ara, evaluate, robustness_curve

    model = _model().train()
    before = _state(model)
    robustness_curve(model, loader, [0.0, 0.05], steps=2, progress=False)
    ara(model, loader, n=4, steps=4, budget=2.0, fab_steps=2, progress=False)
    evaluate(model, loader, eps=0.05, attacks="pgd", steps=2, eps_sweep=[0.05], progress=False)
    x = torch.rand(2, 3, 4, 4)
    adversarial_explanation(model, x, [1], steps=3)
    saliency(model, x)
    _assert_state(model, before)


def test_metrics_and_explanations_under_inference_mode(loader, one_thread):
    from pyadvk.attacks import PGD
    from pyadvk.explain import adversarial_explanation, saliency
    from pyadvk.metrics import evaluate, robust_accuracy

    model = _model().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = adversarial_explanation(model, x, [1], steps=3).adversarial
    kw_eval = dict(eps=0.05, attacks="pgd", steps=2, eps_sweep=[0.05], progress=False)
    report = evaluate(model, loader, **kw_eval)
    with torch.inference_mode():
        xi = x.clone()
        assert torch.equal(adversarial_explanation(model, xi, [1], steps=3).adversarial, expected)
        assert saliency(model, xi).shape == x.shape
        again = evaluate(model, loader, **kw_eval)
        acc = robust_accuracy(model, loader, PGD(model, steps=2, random_start=False), progress=False)
    assert 0.0 <= acc <= 1.0
    assert torch.equal(again.broken_by, report.broken_by) and again.sweep_accuracy == report.sweep_accuracy
    assert [c.status for c in again.checks] == [c.status for c in report.checks]
