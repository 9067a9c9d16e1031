"""Functional forms of pyadvk's layers (like ``torch.nn.functional``)."""

from __future__ import annotations

import torch

from pyadvk.ops import half_huber as _half_huber


def half_huber_relu(x: torch.Tensor, delta: float = 0.5, *, backend: str | None = None) -> torch.Tensor:
    """The Half-Huber ReLU of Woods et al. (2019), elementwise::

        f(x) = 0 for x < 0,  x**2 / (2 delta) for 0 <= x <= delta,  x - delta/2 for x > delta

    A ReLU with its kink rounded into a parabola: f' = clamp(x/delta, 0, 1) is continuous and
    f'' = 1/delta on (0, delta), so penalties on input gradients (double backpropagation) get a
    signal through it. Fused forward, backward and double backward on every body (cuda, triton,
    cpp, torch); float32/float16/bfloat16 computed in float32, float64 in float64; any shape and
    dense layout. See :mod:`pyadvk.ops.half_huber` for the exact arithmetic.

    Args:
        x: input tensor (float32, float16, bfloat16 or float64).
        delta: width of the quadratic part, finite and > 0 (default 0.5, the paper's).
        backend: force a body ("cuda", "triton", "cpp", "torch"); default: see pyadvk.set_backend.
    """
    return _half_huber.half_huber_relu(x, delta, backend=backend)


__all__ = ["half_huber_relu"]
