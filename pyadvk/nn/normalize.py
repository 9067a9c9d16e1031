"""Input normalization as a module: ``Normalize(mean, std)(x) = (x − mean) / std`` per channel.

Most real models (torchvision, timm) take ``(x − mean) / std`` of an image in [0, 1]. Prepending
:class:`Normalize` (``nn.Sequential(Normalize(mean, std), model)``) gives a model of the image
itself, so an attack's eps, a distance and an explanation stay in pixel space. Every attack,
``pyadvk.metrics.*`` and ``pyadvk.explain.*`` take ``normalize=(mean, std)`` (or a
:class:`Normalize`) and do exactly that (:func:`with_normalization`), as torchattacks'
``set_normalization_used`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch
from torch import nn

Values = float | Sequence[float] | torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _values(name: str, value: Values) -> torch.Tensor:
    """``value`` as a 1-D float64 tensor of finite numbers (one per channel, or one for all)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(
                f"{name} must be a number or a 1-D real tensor (one value per channel), got a {value.dtype} tensor "
                f"of shape {tuple(value.shape)}"
            )
        t = value.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(value, Real) and not isinstance(value, bool):
        t = torch.tensor([float(value)], dtype=torch.float64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, Real):
                raise TypeError(f"{name}[{i}] must be a real number, got {type(v).__name__} {v!r}")
        t = torch.tensor([float(v) for v in value], dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got {type(value).__name__}")
    if t.numel() == 0:
        raise ValueError(f"{name} must hold at least one value (one per channel), got none")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


class Normalize(nn.Module):
    """``(x − mean) / std`` along dim 1 (the channels), for inputs (B, C, ...).

    Args:
        mean: one value per channel (a sequence or 1-D tensor of length C), or one number for
            every channel.
        std: the same, every value finite and > 0.

    ``mean`` and ``std`` are float32 buffers of shape (C,) (so ``.to(device)`` moves them and
    ``state_dict`` holds them); the arithmetic runs in the input's dtype. An input whose dim 1 is
    not C raises a ValueError (a single value broadcasts to any C). The inverse is
    :meth:`denormalize`, ``z·std + mean``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Values, std: Values) -> None:
        super().__init__()
        m, s = _values("mean", mean), _values("std", std)
        if m.numel() != s.numel() and 1 not in (m.numel(), s.numel()):
            raise ValueError(
                f"mean and std must have one value per channel each, of the same length; got {m.numel()} mean "
                f"values and {s.numel()} std values"
            )
        if bool((s <= 0).any()):
            raise ValueError(f"std must be > 0 for every channel, got {s.tolist()}")
        m, s = torch.broadcast_tensors(m, s)
        self.register_buffer("mean", m.float().contiguous())
        self.register_buffer("std", s.float().contiguous())

    @property
    def channels(self) -> int | None:
        """C, or None where one value serves any number of channels."""
        return self.mean.numel() if self.mean.numel() > 1 else None

    def _shaped(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a floating tensor, got {what}")
        c = self.channels
        if x.dim() < 2 or (c is not None and x.shape[1] != c):
            raise ValueError(
                f"Normalize expects {name} of shape (B, {c if c is not None else 'C'}, ...) (channels in dim 1, "
                f"one mean/std per channel), got shape {tuple(x.shape)}"
            )
        view = (-1,) + (1,) * (x.dim() - 2)
        mean = self.mean.to(x.device, x.dtype).view(view)
        std = self.std.to(x.device, x.dtype).view(view)
        return mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._shaped(x, "input")
        return (x - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse map, ``z·std + mean`` (from the model's input space back to pixels)."""
        mean, std = self._shaped(z, "z")
        return z * std + mean

    def extra_repr(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return "(" + ", ".join(f"{v:.4g}" for v in t.tolist()) + ")"

        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


NormalizeArg = Normalize | tuple[Values, Values] | None


def as_normalize(normalize: NormalizeArg, name: str = "normalize") -> Normalize | None:
    """``normalize`` as a :class:`Normalize` module: None stays None, a module is returned as is,
    a ``(mean, std)`` pair builds one. Anything else raises a TypeError naming ``name``."""
    if normalize is None or isinstance(normalize, Normalize):
        return normalize
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        return Normalize(*normalize)
    raise TypeError(
        f"{name} must be None, a pyadvk.nn.Normalize or a (mean, std) pair such as "
        f"((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), got {type(normalize).__name__} {normalize!r}"
    )


def with_normalization(model: nn.Module, normalize: NormalizeArg) -> nn.Module:
    """``model`` itself when ``normalize`` is None, else ``nn.Sequential(Normalize(mean, std), model)``
    on the device of the model's first parameter or buffer: a model of pixel-space inputs.

    This is the one place where pyadvk's ``normalize=`` option acts: an attack, metric or
    explanation given ``model, normalize=(mean, std)`` works on exactly the model this returns.
    The model is shared, not copied.
    """
    module = as_normalize(normalize)
    if module is None:
        return model
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
    if isinstance(model, nn.Module):
        ref: torch.Tensor | None = next(iter(model.parameters()), None)
        if ref is None:
            ref = next(iter(model.buffers()), None)
        if ref is not None and module.mean.device != ref.device:
            module = Normalize(module.mean, module.std).to(ref.device)
        return nn.Sequential(module, model)
    return nn.Sequential(module, _Callable(model))


class _Callable(nn.Module):
    """A plain callable (a function of the input) as a module, so it can follow :class:`Normalize`."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "as_normalize", "with_normalization"]
