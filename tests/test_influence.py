"""Influential neurons: batched ablations against one channel at a time, a hand-computed model, the
reductions, and every bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyadvk.stats import influential_neurons


def conv_model(seed=0, batchnorm=True):
    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(3, 7, 3, padding=1),
        nn.BatchNorm2d(7) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(7, 5, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ]
    model = nn.Sequential(*layers)
    if batchnorm:  # non-trivial running statistics
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
    return model


def naive_pd(model, layer, x, target):
    """One forward per channel, zeroing that channel with a hook."""
    module = dict(model.named_modules())[layer]
    model.eval()
    target = torch.as_tensor(target).expand(x.shape[0])
    with torch.no_grad():
        base = torch.softmax(model(x), 1)[torch.arange(len(x)), target]
        channels = []
        shapes = []
        h = module.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
        model(x)
        h.remove()
        for n in range(shapes[0][1]):

            def zero(m, i, o, n=n):
                o = o.clone()
                o[:, n] = 0
                return o

            h = module.register_forward_hook(zero)
            channels.append(base - torch.softmax(model(x), 1)[torch.arange(len(x)), target])
            h.remove()
    return torch.stack(channels, 1), base


@pytest.mark.parametrize("layer", ["1", "2", "3"])
@pytest.mark.parametrize("batch_channels", [1, 3, 64])
def test_batched_equals_one_channel_at_a_time(layer, batch_channels):
    model = conv_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 6, 6, generator=gen)
    target = torch.tensor([0, 2, 3])
    r = influential_neurons(model, layer, x, target, k=4, batch_channels=batch_channels, reduce="none")
    expected, base = naive_pd(model, layer, x, target)
    torch.testing.assert_close(r.all_pd, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.probability, base)
    values = expected.topk(4, dim=1).values
    torch.testing.assert_close(r.pd, values, rtol=0, atol=1e-6)
    assert r.channels.shape == (3, 4)
    torch.testing.assert_close(r.all_pd.gather(1, r.channels), r.pd)


def test_mean_reduction_and_int_target():
    model = conv_model(2)
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    r = influential_neurons(model, "3", x, 1, k=3, batch_channels=2)
    expected, _ = naive_pd(model, "3", x, 1)
    values, order = expected.mean(0).topk(3)
    assert r.channels.tolist() == order.tolist() and r.reduce == "mean"
    torch.testing.assert_close(r.pd, values, rtol=0, atol=1e-6)


def test_hand_computed_pd():
    # logits = W · relu(h) with h the layer output (the input itself): zeroing channel n removes
    # its contribution, so PD is computable by hand.
    class Linear2(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.head = nn.Linear(3, 2, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))

        def forward(self, x):
            return self.head(self.feat(x))

    x = torch.tensor([[1.0, 1.0, 1.0]])
    r = influential_neurons(Linear2(), "feat", x, 0, k=3)
    p = lambda a, b: torch.softmax(torch.tensor([a, b]), 0)[0].item()  # noqa: E731
    base = p(3.0, 1.0)
    expected = [base - p(1.0, 1.0), base - p(3.0, 0.0), base - p(2.0, 1.0)]
    torch.testing.assert_close(r.all_pd[0], torch.tensor(expected), rtol=0, atol=1e-6)
    assert r.channels.tolist() == [0, 2, 1]  # channel 1 feeds the other class: PD < 0
    assert r.pd[2] < 0


def test_modes_restored_and_no_grads():
    model = conv_model().train()
    x = torch.rand(2, 3, 6, 6)
    before = model[1].running_mean.clone()
    influential_neurons(model, "1", x, 0, k=2)
    assert model.training
    torch.testing.assert_close(model[1].running_mean, before, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert not model[1]._forward_hooks  # the hook is removed


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layer": "9"}, ValueError, r"layer '9' is not a layer of Sequential; valid names: 0, 1, 2"),
        ({"k": 0}, ValueError, "k must be >= 1, got 0"),
        ({"k": 8}, ValueError, r"k must be <= the number of channels of layer '1' \(7\), got 8"),
        ({"batch_channels": 0}, ValueError, "batch_channels must be >= 1, got 0"),
        ({"reduce": "max"}, ValueError, "reduce must be one of 'mean', 'none'; got 'max'"),
        ({"target": 4}, ValueError, r"target must be class indices in \[0, 4\), got values in \[4, 4\]"),
        ({"target": -1}, ValueError, "target must be >= 0, got -1"),
        ({"target": 1.0}, TypeError, "target must be an int"),
        ({"target": torch.tensor([0, 1])}, ValueError, r"int64 tensor of shape \(3,\)"),
        ({"x": torch.rand(0, 3, 6, 6)}, ValueError, "at least one image"),
        ({"x": torch.zeros(3, 3, 6, 6, dtype=torch.int64)}, TypeError, "x must be float32"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(model=conv_model(), layer="1", x=torch.rand(3, 3, 6, 6), target=0, k=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        influential_neurons(**args)


def test_layer_with_a_flat_output_is_rejected():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()

        def forward(self, x):
            return x.flatten(1)[:, :3] + self.feat(x.sum()) * 0

    with pytest.raises(ValueError, match=r"layer 'feat' must output a tensor \(B, C, ...\)"):
        influential_neurons(Scalar(), "feat", torch.rand(2, 4), 0, k=1)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model = conv_model()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    cpu = influential_neurons(model, "1", x, 2, k=3, batch_channels=4, reduce="none")
    gpu = influential_neurons(model.cuda(), "1", x.cuda(), 2, k=3, batch_channels=4, reduce="none")
    torch.testing.assert_close(gpu.all_pd.cpu(), cpu.all_pd, rtol=0, atol=1e-5)
