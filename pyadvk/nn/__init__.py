"""Layers and parametrizations: ``spectral_norm`` (true operator norms of convolutions)."""

from pyadvk.nn.spectral_norm import ConvSpectralNorm, spectral_norm
