"""Lipschitz toolkit: operator norms of convolutions (exact by power iteration, certified by Gram
iteration), per-layer spectral norms of a model, a Lipschitz bound of the model, a differentiable
Lipschitz penalty for training, and the robust-training additions of Woods et al. 2019 (the
input-gradient penalty and its adaptive weight)."""

from pyadvk.lipschitz.conv import ConvNormState, conv_norm_bound, conv_operator_norm
from pyadvk.lipschitz.model import LipschitzParts, SpectralNormState, clear_state, lipschitz_bound, spectral_norms
from pyadvk.lipschitz.penalty import LipschitzPenalty
from pyadvk.lipschitz.robust import AdaptivePsi, input_gradient_penalty

__all__ = [
    "AdaptivePsi",
    "ConvNormState",
    "LipschitzParts",
    "LipschitzPenalty",
    "SpectralNormState",
    "clear_state",
    "conv_norm_bound",
    "conv_operator_norm",
    "input_gradient_penalty",
    "lipschitz_bound",
    "spectral_norms",
]
