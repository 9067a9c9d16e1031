"""``spectral_norm``: torch.nn.utils.parametrizations.spectral_norm with true convolution norms.

torch's parametrization divides a convolution's weight by the spectral norm of the reshaped
kernel ``W.reshape(C_out, -1)``, which is not the layer's operator norm (see
:mod:`pyadvk.lipschitz.conv`). This one divides by the operator norm of the convolution on
inputs of ``input_shape``, estimated by power iteration with the convolution and its transpose:
the buffers ``_u`` (output-shaped) and ``_v`` (input-shaped) hold the singular vectors, updated by
``n_power_iterations`` steps per weight access in training mode only, and
``σ = <u, conv(v; W)>`` is differentiable in ``W``. For every other module (Linear, ...) the
matrix norm *is* the operator norm and torch's own parametrization is used unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from pyadvk import _checks
from pyadvk.lipschitz import conv as conv_norms


class ConvSpectralNorm(nn.Module):
    """Parametrization ``W -> W / ||conv_W||_2`` for a convolution on ``input_shape``."""

    _u: torch.Tensor  # buffers: the left (output-shaped) and right (input-shaped) singular vectors
    _v: torch.Tensor

    def __init__(
        self,
        conv: conv_norms.Conv,
        input_shape: Sequence[int],
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        shape = conv_norms.check_input_shape(conv, input_shape)
        self.n_power_iterations = _checks.integer("n_power_iterations", n_power_iterations, low=1)
        self.eps = _checks.real("eps", eps, low=0.0)
        # A functional copy of the layer's convolution (its stride, padding, mode, dilation,
        # groups), holding no parameters: the parametrization must not own the weight.
        self._conv = [conv]
        w = conv.weight
        v = torch.randn((1, *shape), generator=generator).to(w.device)
        self.register_buffer("_v", v / v.norm())
        out = conv_norms.output_spatial(conv, shape[1:])
        self.register_buffer("_u", torch.zeros((1, conv.out_channels, *out), device=w.device))
        self.input_shape = shape
        self._power_method(w, 15)

    @torch.no_grad()
    def _power_method(self, weight: torch.Tensor, n_iters: int) -> None:
        _, u, v = conv_norms.power_step(self._conv[0], weight, self._v.float(), n_iters)
        # clones, as torch does: the buffers may be read by autograd of an earlier forward
        self._u = u.clone(memory_format=torch.contiguous_format)
        self._v = v.clone(memory_format=torch.contiguous_format)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._power_method(weight, self.n_power_iterations)
        u, v = self._u.clone(), self._v.clone()
        sigma = (u * conv_norms.linear_part(self._conv[0], v.to(weight.dtype), weight)).sum()
        return weight / sigma.clamp_min(self.eps)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value  # as torch's: the assigned weight is taken as the unnormalized weight

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, n_power_iterations={self.n_power_iterations}"


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` that divides a convolution's
    weight by the convolution's true operator norm on inputs of ``input_shape`` (``(C_in,
    *spatial)``, required for nn.Conv1d/2d/3d). Other modules get torch's parametrization (their
    matrix norm is their operator norm). Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        raise TypeError(
            f"module is a {type(module).__name__}: pyadvk.nn.spectral_norm has no true operator norm "
            "for transposed convolutions; use torch.nn.utils.parametrizations.spectral_norm"
        )
    if not isinstance(module, conv_norms.CONVS):
        return torch.nn.utils.parametrizations.spectral_norm(module, name, n_power_iterations, eps, dim)
    if name != "weight":
        raise ValueError(f"name must be 'weight' for a convolution (the kernel it convolves with), got {name!r}")
    if input_shape is None:
        raise ValueError(
            f"input_shape is required for {type(module).__name__}: the operator norm of a convolution "
            "depends on its input size; pass (C_in, *spatial)"
        )
    if dim not in (None, 0):
        raise ValueError(f"dim must be None or 0 for a convolution, got {dim!r}")
    parametrize.register_parametrization(
        module, "weight", ConvSpectralNorm(module, input_shape, n_power_iterations, eps)
    )
    return module
