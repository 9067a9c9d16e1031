"""Layers and parametrizations: ``HalfHuberReLU`` (and ``pyadvk.nn.functional``), and
``spectral_norm`` (true operator norms of convolutions)."""

from pyadvk.nn import functional
from pyadvk.nn.half_huber import HalfHuberReLU
from pyadvk.nn.spectral_norm import ConvSpectralNorm, spectral_norm

__all__ = ["ConvSpectralNorm", "HalfHuberReLU", "functional", "spectral_norm"]
