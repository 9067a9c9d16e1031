"""A differentiable Lipschitz penalty on the spectral norms of a model's layers.

Each step (``forward()``), ``n_iters`` warm-started power iterations run without autograd and give,
per layer, unit vectors ``u`` (left) and ``v`` (right); then ``σ = uᵀ W v`` is computed *with*
autograd, so ``∂σ/∂W = u vᵀ``: the gradient of the top singular value at the fixed point of the
iteration (exact for a converged, simple top singular value). For a convolution under
``method="power"``, ``u`` is output-shaped, ``v`` input-shaped and ``σ = <u, conv(v; W)>`` (the
gradient is the correlation of u and v, the true operator norm's gradient).

Kinds (per layer σ_i, summed over layers):

* ``"hinge"``: ``Σ relu(σ_i - target)²``: no pull below ``target``, quadratic above;
* ``"log"``: ``Σ log(σ_i / target)²``: pulls every σ_i toward ``target`` from both sides
  (``log(σ)²`` for the default target 1), scale-free.

The iteration state (``u`` for matrices, ``v`` for true conv norms) lives in buffers, so it is in
the module's ``state_dict``; the start vectors come from a generator seeded with ``seed``, so
every DDP rank holding identical weights computes identical vectors and the same penalty without
any communication. Buffers are updated in training mode only (like torch's spectral_norm);
in eval mode ``forward`` reuses the stored vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyadvk import _checks
from pyadvk.lipschitz import conv as conv_norms
from pyadvk.lipschitz.model import input_shapes, layers_of
from pyadvk.ops import power_iteration as _power_iteration_fn
from pyadvk.ops.power_iteration import as_matrix

KINDS = ("hinge", "log")


def _buffer_name(prefix: str, layer: str) -> str:
    return f"{prefix}_{layer.replace('.', '_')}"


class LipschitzPenalty(nn.Module):
    """``penalty = LipschitzPenalty(model, input_shape)``; ``loss = task_loss + lam * penalty()``.

    Args:
        model: module with Linear/Conv layers (held by reference, not registered as a submodule,
            so the penalty's state_dict holds only its own vectors).
        input_shape: the model's input shape without batch dim (needed for ``method="power"``
            when the model has convolutions).
        kind: ``"hinge"`` or ``"log"`` (module docstring).
        target: σ target (> 0).
        n_iters: power iterations per ``forward`` (>= 1); 1 suffices with warm starts.
        method: ``"reshaped"`` (reshaped-kernel matrices, one batched op for the whole model) or
            ``"power"`` (true operator norms of convolutions).
        init_iters: iterations run at construction so the first σ is already accurate.
        seed: seed of the start vectors (identical on every rank).
        generator: draw the start vectors from this generator instead of one seeded with
            ``seed`` (drawn on its device, then moved to the weights').
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int] | None = None,
        kind: str = "hinge",
        target: float = 1.0,
        n_iters: int = 1,
        method: str = "reshaped",
        *,
        init_iters: int = 20,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kind = _checks.choice("kind", kind, KINDS)
        self.method = _checks.choice("method", method, ("reshaped", "power"))
        self.target = _checks.real("target", target, low=0.0, low_inclusive=False)
        self.n_iters = _checks.integer("n_iters", n_iters, low=1)
        init_iters = _checks.integer("init_iters", init_iters, low=0)
        layers = layers_of(model)
        self._layers = layers  # a plain list: the model's parameters are not registered here
        self._matrix = [(n, m) for n, m in layers if self.method == "reshaped" or isinstance(m, nn.Linear)]
        self._convs = [(n, m) for n, m in layers if self.method == "power" and isinstance(m, conv_norms.CONVS)]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        gen = generator if generator is not None else torch.Generator().manual_seed(_checks.integer("seed", seed))
        shapes: dict[nn.Module, tuple[int, ...]] = {}
        if self._convs:
            if input_shape is None:
                raise ValueError("input_shape is needed for method='power' on a model with convolutions")
            shapes = input_shapes(model, input_shape)
        for n, m in self._matrix:
            w = m.weight
            u = torch.randn(w.shape[0], generator=gen, device=gen.device)
            self.register_buffer(_buffer_name("u", n), u.to(w.device))
            self.register_buffer(_buffer_name("v", n), torch.zeros(as_matrix("weight", w).shape[1], device=w.device))
        self._conv_shapes: dict[str, tuple[int, ...]] = {}
        for n, m in self._convs:
            if m not in shapes:
                raise ValueError(f"layer {n!r} is not used by the model's forward: no input shape")
            shape = conv_norms.check_input_shape(m, shapes[m], layer=n)
            self._conv_shapes[n] = shape
            v = torch.randn((1, *shape), generator=gen, device=gen.device)
            self.register_buffer(_buffer_name("v", n), (v / v.norm()).to(m.weight.device))
            out = conv_norms.output_spatial(m, shape[1:])
            self.register_buffer(_buffer_name("u", n), torch.zeros((1, m.out_channels, *out), device=m.weight.device))
        self.last_sigmas: dict[str, torch.Tensor] = {}
        if init_iters:
            self.update(init_iters)

    @torch.no_grad()
    def update(self, n_iters: int | None = None) -> None:
        """Runs ``n_iters`` (default: ``self.n_iters``) iterations, updating the buffers."""
        n_iters = self.n_iters if n_iters is None else _checks.integer("n_iters", n_iters, low=1)
        if self._matrix:
            groups: dict[tuple, list] = {}
            for n, m in self._matrix:
                groups.setdefault((m.weight.device, m.weight.dtype), []).append(n)
            mods = dict(self._matrix)
            for names in groups.values():
                mats = [as_matrix(f"weight of {n}", mods[n].weight) for n in names]
                us = [getattr(self, _buffer_name("u", n)) for n in names]
                _, us, vs = _power_iteration_fn(mats, us, n_iters)
                for n, u, v in zip(names, us, vs):
                    getattr(self, _buffer_name("u", n)).copy_(u)
                    getattr(self, _buffer_name("v", n)).copy_(v)
        for n, m in self._convs:
            vb = getattr(self, _buffer_name("v", n))
            _, u, v = conv_norms.power_step(m, m.weight, vb.float(), n_iters)
            getattr(self, _buffer_name("u", n)).copy_(u)
            vb.copy_(v)

    def sigmas(self) -> dict[str, torch.Tensor]:
        """Differentiable σ per layer from the stored vectors (no iteration)."""
        out = {}
        for n, m in self._matrix:
            u = getattr(self, _buffer_name("u", n))
            v = getattr(self, _buffer_name("v", n))
            w = m.weight.reshape(m.weight.shape[0], -1).float()
            out[n] = torch.dot(u, torch.mv(w, v))
        for n, m in self._convs:
            u = getattr(self, _buffer_name("u", n))
            v = getattr(self, _buffer_name("v", n))
            out[n] = (u * conv_norms.linear_part(m, v, m.weight.float())).sum()
        return {n: out[n] for n, _ in self._layers}

    def forward(self) -> torch.Tensor:
        """Updates the vectors (training mode) and returns the penalty (a differentiable scalar)."""
        if self.training:
            self.update()
        sig = self.sigmas()
        self.last_sigmas = {n: s.detach() for n, s in sig.items()}
        s = torch.stack(list(sig.values()))
        if self.kind == "hinge":
            return torch.relu(s - self.target).pow(2).sum()
        return torch.log(s.clamp_min(torch.finfo(torch.float32).tiny) / self.target).pow(2).sum()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, target={self.target}, n_iters={self.n_iters}, method={self.method!r}, "
            f"layers={len(self._layers)}"
        )
