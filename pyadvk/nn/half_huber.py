"""``HalfHuberReLU``: the module form of :func:`pyadvk.nn.functional.half_huber_relu`."""

from __future__ import annotations

import torch
from torch import nn

from pyadvk import _backend
from pyadvk.nn import functional as F
from pyadvk.ops.half_huber import check_delta


class HalfHuberReLU(nn.Module):
    """Half-Huber ReLU (Woods et al. 2019): ``0`` for x < 0, ``x**2/(2 delta)`` on [0, delta],
    ``x - delta/2`` above; a drop-in for ``nn.ReLU`` whose second derivative is non-zero on
    (0, delta), for training with an input-gradient penalty.

    Args:
        delta: width of the quadratic part, finite and > 0 (default 0.5, the paper's).
        backend: force a body for every call ("cuda", "triton", "cpp", "torch"); default None
            follows pyadvk.set_backend / auto.

    Shape: any; the output has the input's shape, dtype and (dense) memory format.
    """

    def __init__(self, delta: float = 0.5, *, backend: str | None = None):
        super().__init__()
        self.delta = check_delta(delta)
        self.backend = None if backend is None else _backend._check_choice(backend, "backend")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.half_huber_relu(x, self.delta, backend=self.backend)

    def extra_repr(self) -> str:
        return f"delta={self.delta}" + (f", backend={self.backend!r}" if self.backend else "")
