"""Lipschitz toolkit: operator norms of convolutions (exact by power iteration, certified by Gram
iteration), per-layer spectral norms of a model, a Lipschitz bound of the model, and a
differentiable Lipschitz penalty for training."""

from pyadvk.lipschitz.conv import ConvNormState, conv_norm_bound, conv_operator_norm
from pyadvk.lipschitz.model import SpectralNormState, clear_state, lipschitz_bound, spectral_norms
from pyadvk.lipschitz.penalty import LipschitzPenalty
