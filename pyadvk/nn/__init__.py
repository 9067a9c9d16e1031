"""Layers: ``HalfHuberReLU`` (and ``pyadvk.nn.functional``)."""

from pyadvk.nn import functional
from pyadvk.nn.half_huber import HalfHuberReLU

__all__ = ["HalfHuberReLU", "functional"]
