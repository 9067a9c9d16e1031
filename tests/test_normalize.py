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
