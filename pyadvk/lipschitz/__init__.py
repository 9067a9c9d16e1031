"""Lipschitz tools: the input-gradient penalty and its adaptive weight (Woods et al. 2019)."""

from pyadvk.lipschitz.robust import AdaptivePsi, input_gradient_penalty

__all__ = ["AdaptivePsi", "input_gradient_penalty"]
