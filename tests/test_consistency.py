"""Neuron consistency (paper 2): hand-computed top-K labels and pᵀAp on a model whose layer output
and predictions are set by its input, agreement with a store-everything computation, the
representation consistency, and every bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyadvk.stats import consistency, consistency_score, representation_consistency


class Controlled(nn.Module):
    """Input (B, 1 + C, H, W): channel 0 holds the predicted class (at [0, 0]); channels 1..C pass
    through the layer ``feat`` unchanged, so the test sets the layer's output."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.feat = nn.Identity()
        self.head = nn.Flatten()
        self.register_buffer("anchor", torch.zeros(()))  # places the model (and its inputs) on a device

    def forward(self, x):
        self.head(self.feat(x[:, 1:]))
        return nn.functional.one_hot(x[:, 0, 0, 0].round().long(), self.classes).float() * 10


def make_images(features: torch.Tensor, predicted: list[int]) -> torch.Tensor:
    """features (B, C, H, W) -> model input whose layer output is ``features`` and whose prediction is
    ``predicted``."""
    cls = torch.tensor(predicted, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, *features.shape[2:])
    return torch.cat([cls, features], dim=1)


def spatial(*maps):
    """Per image a list of per-channel spatial lists -> (B, C, 1, W)."""
    return torch.tensor(maps, dtype=torch.float32).unsqueeze(2)


# Real set, 4 images, 2 channels, spatial size 1×2; true labels and (different) predictions.
REAL_FEATURES = spatial(
    [[5, 0], [0, 0]],
    [[1, 1], [3, 3]],
    [[4, 4], [1, 1]],
    [[0, 0], [0, 2]],
)
REAL_TRUE = [0, 1, 0, 2]
REAL_PREDICTED = [0, 2, 2, 2]
# Adversarial set, 4 images (paired with the real ones), predictions = their labels.
ADV_FEATURES = spatial(
    [[6, 0], [0, 0]],
    [[0, 0], [2.5, 2.5]],
    [[2, 2], [0, 0]],
    [[0, 0], [9, 0]],
)
ADV_PREDICTED = [1, 1, 2, 0]


def loaders(batch_size=2):
    real = TensorDataset(make_images(REAL_FEATURES, REAL_PREDICTED), torch.tensor(REAL_TRUE))
    adv = TensorDataset(make_images(ADV_FEATURES, ADV_PREDICTED), torch.tensor([7, 7, 7, 7]))  # labels ignored
    return DataLoader(real, batch_size=batch_size), DataLoader(adv, batch_size=batch_size)


def test_hand_computed_max():
    real, adv = loaders()
    r = consistency(Controlled(), "feat", real, adv, topk=2)
    # channel 0, max: real [5, 1, 4, 0] -> images 0, 2 (labels 0, 0); adv [6, 0, 2, 0] -> 0, 2 (1, 2)
    # channel 1, max: real [0, 3, 1, 2] -> images 1, 3 (labels 1, 2); adv [0, 2.5, 0, 9] -> 3, 1 (0, 1)
    assert r.topk_indices_real.tolist() == [[0, 2], [1, 3]]
    assert r.topk_labels_real.tolist() == [[0, 0], [1, 2]]
    assert r.topk_values_real.tolist() == [[5, 4], [3, 2]]
    assert r.topk_indices_adv.tolist() == [[0, 2], [3, 1]]
    assert r.topk_labels_adv.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(r.label_distribution_real, torch.tensor([[1, 0, 0], [0, 0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(
        r.label_distribution_adv, torch.tensor([[0, 0.5, 0.5], [0.5, 0.5, 0]], dtype=torch.float64)
    )
    torch.testing.assert_close(r.consistency_real, torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(r.consistency_adv, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # together: channel 0 [5, 4 | 6, 2] -> 6 (adv), 5 (real): 1/2; channel 1 [3, 2 | 9, 2.5] -> 9, 3: 1/2
    torch.testing.assert_close(r.adversarial_fraction, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert (r.num_real, r.num_adv, r.num_classes, r.num_channels) == (4, 4, 3, 2)


def test_hand_computed_mean_predicted_labels_and_similarity():
    real, adv = loaders(batch_size=3)  # batches of 3 and 1
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.5, 1.0]])
    r = consistency(Controlled(), "feat", real, adv, topk=2, class_similarity=a, reduce="mean", real_labels="predicted")
    # channel 0, mean: real [2.5, 1, 4, 0] -> images 2, 0 (predicted 2, 0);
    #   adv [3, 0, 2, 0] -> 0, 2 (1, 2)
    # channel 1, mean: real [0, 3, 1, 1] -> 1, then 2 and 3 tie at 1: the earlier (2) stays (2, 2)
    #   adv [0, 2.5, 0, 4.5] -> 3, 1 (0, 1)
    assert r.topk_indices_real.tolist() == [[2, 0], [1, 2]]
    assert r.topk_labels_real.tolist() == [[2, 0], [2, 2]]
    assert r.topk_indices_adv.tolist() == [[0, 2], [3, 1]]
    # pᵀAp: [.5, 0, .5] -> .25 + .25 = .5; [0, 0, 1] -> 1; [0, .5, .5] -> .25 + .25 + 2·.25·.5 = .75;
    # [.5, .5, 0] -> .5
    torch.testing.assert_close(r.consistency_real, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(r.consistency_adv, torch.tensor([0.75, 0.5], dtype=torch.float64))
    # together: channel 0 [4, 2.5 | 3, 2] -> 4, 3: 1/2; channel 1 [3, 1 | 4.5, 2.5] -> 4.5, 3: 1/2
    torch.testing.assert_close(r.adversarial_fraction, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_representation_consistency_is_the_mean_cosine_of_paired_outputs():
    real, adv = loaders()
    r = consistency(Controlled(), "feat", real, adv, topk=1)
    expected = nn.functional.cosine_similarity(REAL_FEATURES.flatten(1), ADV_FEATURES.flatten(1), dim=1)
    torch.testing.assert_close(r.cosine, expected)
    assert r.representation_consistency == pytest.approx(float(expected.mean()), abs=1e-7)
    direct = representation_consistency(
        Controlled(),
        "feat",
        make_images(REAL_FEATURES, REAL_PREDICTED),
        make_images(ADV_FEATURES, ADV_PREDICTED),
        batch_size=3,
    )
    assert direct == pytest.approx(float(expected.mean()), abs=1e-7)
    summary = r.summary()
    assert summary["representation_consistency"] == r.representation_consistency
    assert summary["consistency_real"] == pytest.approx(float(r.consistency_real.mean()))
    assert summary["channels"] == 2 and summary["topk"] == 1 and summary["layer"] == "feat"


def test_unpaired_sets_of_different_sizes():
    real, _ = loaders()
    adv = [make_images(ADV_FEATURES[:3], ADV_PREDICTED[:3])]  # bare tensors, 3 images
    r = consistency(Controlled(), "feat", real, adv, topk=2, paired=False)
    assert r.num_adv == 3 and r.cosine is None and r.representation_consistency is None
    assert r.summary()["representation_consistency"] is None
    assert r.topk_indices_adv.tolist() == [[0, 2], [1, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_streaming_equals_storing_everything(seed, reduce):
    gen = torch.Generator().manual_seed(seed)
    n, channels, classes, k = 37, 5, 4, 6
    feats, feats_adv = torch.randn(n, channels, 3, 2, generator=gen), torch.randn(n, channels, 3, 2, generator=gen)
    true = torch.randint(0, classes, (n,), generator=gen)
    pred = torch.randint(0, classes, (n,), generator=gen).tolist()
    pred_adv = torch.randint(0, classes, (n,), generator=gen).tolist()
    a = torch.rand(classes, classes, generator=gen)
    a = (a + a.t()) / 2
    a.fill_diagonal_(1.0)
    real = DataLoader(TensorDataset(make_images(feats, pred), true), batch_size=8)
    adv = DataLoader(TensorDataset(make_images(feats_adv, pred_adv)), batch_size=8)
    r = consistency(Controlled(classes), "feat", real, adv, topk=k, class_similarity=a, reduce=reduce)

    def naive(f, labels):
        act = f.flatten(2).amax(2) if reduce == "max" else f.flatten(2).mean(2)  # (n, C)
        top = act.t().argsort(dim=1, descending=True)[:, :k]
        p = nn.functional.one_hot(labels[top], classes).double().mean(1)
        return top, p, act.t().gather(1, top)

    top, p, vals = naive(feats, true)
    top_adv, p_adv, vals_adv = naive(feats_adv, torch.tensor(pred_adv))
    assert r.topk_indices_real.tolist() == top.tolist()
    assert r.topk_indices_adv.tolist() == top_adv.tolist()
    torch.testing.assert_close(r.topk_values_real, vals)
    torch.testing.assert_close(r.consistency_real, torch.einsum("nc,cd,nd->n", p, a.double(), p))
    torch.testing.assert_close(r.consistency_adv, torch.einsum("nc,cd,nd->n", p_adv, a.double(), p_adv))
    both = torch.cat([vals, vals_adv], 1)
    flags = torch.cat([torch.zeros_like(vals), torch.ones_like(vals_adv)], 1)
    frac = flags.gather(1, both.argsort(1, descending=True)[:, :k]).double().mean(1)
    torch.testing.assert_close(r.adversarial_fraction, frac)


def test_dense_layer_outputs_and_model_modes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(10, 3, 2, 2, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    x_adv = (x + 0.1 * torch.randn(10, 3, 2, 2, generator=gen)).clamp(0, 1)
    r = consistency(model, "2", [(x, y)], [(x_adv, y)], topk=3)
    assert model.training and all(m.training for m in model.modules())
    assert r.consistency_real.shape == (6,) and ((r.consistency_real >= 1 / 3 - 1e-9) & (r.consistency_real <= 1)).all()
    with torch.no_grad():
        model.eval()
        f, f_adv = model[:3](x), model[:3](x_adv)
    torch.testing.assert_close(r.cosine, nn.functional.cosine_similarity(f, f_adv, dim=1))


def test_consistency_score_identity_is_purity():
    p = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(consistency_score(p), torch.tensor([0.375, 1.0]))
    torch.testing.assert_close(consistency_score(p, torch.eye(3)), torch.tensor([0.375, 1.0]))


def _good_args(**overrides):
    real, adv = loaders()
    args = dict(model=Controlled(), layer="feat", real_loader=real, adv_loader=adv, topk=2)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"layer": "conv9"}, ValueError, r"layer 'conv9' is not a layer of Controlled; valid names: feat, head"),
        ({"layer": 3}, TypeError, "layer must be a layer name"),
        ({"model": lambda x: x}, TypeError, "model must be an nn.Module"),
        ({"topk": 0}, ValueError, "topk must be >= 1, got 0"),
        ({"topk": 5}, ValueError, r"topk must be <= the number of images in real_loader \(4\), got 5"),
        ({"reduce": "median"}, ValueError, "reduce must be one of 'max', 'mean'; got 'median'"),
        ({"real_labels": "guess"}, ValueError, "real_labels must be one of 'true', 'predicted'"),
        ({"paired": 1}, TypeError, "paired must be a bool"),
        ({"class_similarity": torch.eye(4)}, ValueError, r"class_similarity must be \(3, 3\) for a model with 3"),
        ({"class_similarity": torch.ones(3, 2)}, ValueError, "must be a square"),
        ({"class_similarity": torch.eye(3, dtype=torch.int64)}, TypeError, "must be a floating tensor"),
        ({"class_similarity": [[1.0]]}, TypeError, "must be a \\(C, C\\) tensor"),
        ({"class_similarity": torch.tensor([[1.0, 0.2, 0], [0, 1, 0], [0, 0, 1]])}, ValueError, "must be symmetric"),
        ({"class_similarity": torch.tensor([[1.0, -0.2, 0], [-0.2, 1, 0], [0, 0, 1]])}, ValueError, ">= 0"),
        ({"class_similarity": torch.eye(3) * 2}, ValueError, "unit diagonal"),
        ({"class_similarity": torch.full((3, 3), float("nan"))}, ValueError, "finite"),
    ],
)
def test_bad_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        consistency(**_good_args(**overrides))


def test_bad_loaders():
    real, adv = loaders()
    model = Controlled()
    images = make_images(REAL_FEATURES, REAL_PREDICTED)
    with pytest.raises(ValueError, match="paired loaders must have the same length: real_loader has more"):
        consistency(model, "feat", real, [next(iter(adv))], topk=1)
    with pytest.raises(ValueError, match="paired loaders must have the same length: adv_loader has more"):
        consistency(model, "feat", [next(iter(real))], adv, topk=1)
    with pytest.raises(ValueError, match="paired batches must match"):
        consistency(model, "feat", [(images, torch.tensor(REAL_TRUE))], [images[:3]], topk=1)
    with pytest.raises(ValueError, match=r"real_loader must yield \(images, labels\)"):
        consistency(model, "feat", [images], adv, topk=1)
    with pytest.raises(ValueError, match=r"real_loader labels must be in \[0, 3\), got \[0, 5\]"):
        consistency(model, "feat", [(images, torch.tensor([0, 1, 5, 2]))], [images], topk=1)
    with pytest.raises(ValueError, match="real_loader labels must be int64"):
        consistency(model, "feat", [(images, torch.tensor([0.0, 1, 1, 2]))], [images], topk=1)
    with pytest.raises(TypeError, match="adv_loader must yield tensors"):
        consistency(model, "feat", [(images, torch.tensor(REAL_TRUE))], ["x"], topk=1)
    with pytest.raises(ValueError, match="topk must be <= the number of images in real_loader \\(0\\)"):
        consistency(model, "feat", [], [], topk=1)
    nan_images = images.clone()
    nan_images[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN activations"):
        consistency(model, "feat", [(nan_images, torch.tensor(REAL_TRUE))], [images], topk=1)


def test_bad_layer_outputs():
    class OneDim(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()

        def forward(self, x):
            return torch.zeros(x.shape[0], 2) + self.feat(x.sum()).sum() * 0

    x = torch.rand(3, 2)
    with pytest.raises(ValueError, match=r"layer 'feat' must output \(B, C, ...\) with B = 3"):
        consistency(OneDim(), "feat", [(x, torch.zeros(3, dtype=torch.int64))], [x], topk=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()

        def forward(self, x):
            return self.feat(self.feat(x))

    with pytest.raises(RuntimeError, match="layer 'feat' ran 2 times in one forward"):
        consistency(Twice(), "feat", [(x, torch.zeros(3, dtype=torch.int64))], [x], topk=1)


def test_representation_consistency_errors():
    model = Controlled()
    x = make_images(REAL_FEATURES, REAL_PREDICTED)
    with pytest.raises(ValueError, match="x_adv must have the shape of x"):
        representation_consistency(model, "feat", x, x[:2])
    with pytest.raises(ValueError, match="is not a layer"):
        representation_consistency(model, "nope", x, x)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        representation_consistency(model, "feat", x, x, batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        representation_consistency(model, "feat", x[:0], x[:0])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    real, adv = loaders()
    cpu = consistency(Controlled(), "feat", real, adv, topk=2)
    gpu = consistency(Controlled().cuda(), "feat", real, adv, topk=2, class_similarity=torch.eye(3))
    torch.testing.assert_close(gpu.consistency_real.cpu(), cpu.consistency_real)
    torch.testing.assert_close(gpu.adversarial_fraction.cpu(), cpu.adversarial_fraction)
    assert gpu.topk_indices_adv.is_cuda
    assert gpu.topk_indices_adv.cpu().tolist() == cpu.topk_indices_adv.tolist()
