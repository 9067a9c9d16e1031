"""Layers and parametrizations: ``HalfHuberReLU`` (and ``pyadvk.nn.functional``),
``spectral_norm`` (true operator norms of convolutions), and ``Normalize`` (per-channel input
normalization to prepend to a model that expects ``(x − mean) / std``)."""

from pyadvk.nn import functional
from pyadvk.nn.half_huber import HalfHuberReLU
from pyadvk.nn.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize, with_normalization
from pyadvk.nn.spectral_norm import ConvSpectralNorm, spectral_norm

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConvSpectralNorm",
    "HalfHuberReLU",
    "Normalize",
    "functional",
    "spectral_norm",
    "with_normalization",
]
