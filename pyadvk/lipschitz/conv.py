"""Operator norms of convolutions: exact-but-iterative and cheap-and-certified.

A convolution layer ``conv`` (nn.Conv1d/2d/3d) acting on inputs of shape ``input_shape =
(C_in, *spatial)`` is a linear map ``A`` (its bias only shifts the output, so it does not change
the Lipschitz constant) from ``R^(C_in·Πspatial)`` to the output space. Its Lipschitz constant in
the 2-norm is the spectral norm ``||A||_2``, which depends on the input size, the stride, the
dilation, the groups and the padding:

* :func:`conv_operator_norm`: power iteration with ``A`` (the layer's own convolution, padding
  mode included) and its adjoint ``Aᵀ`` (``conv_transpose``, i.e. the input gradient of the
  convolution), warm-started through a :class:`ConvNormState`. Each iteration costs one
  convolution and one transposed convolution of a single input. The estimate ``σ = <u, A v>``
  approaches ``||A||_2`` from below.
* :func:`conv_norm_bound`: a certified upper bound that does no input-sized convolution work:
  Gram iteration (Delattre, Barthélemy, Araujo, Allauzen, ICML 2023; "Spectral norm of
  convolutional layers with circular and zero paddings", 2024) on the kernel's frequency
  representation. The kernel, zero-embedded in a circular grid of size ``N``, is FFT-ed once; a
  circular convolution is block-diagonalized by the DFT (Sedghi, Gupta, Long, ICLR 2019), so its
  norm is ``max_ω σ_max(K̂(ω))`` over the ``C_out × C_in`` matrices ``K̂(ω)``. Gram iteration
  bounds each: ``σ_max(G) <= ||G_t||_F^(1/2^t)`` with ``G_{t+1} = G_tᴴ G_t`` (rescaled at every
  step so nothing overflows), and the bound tightens to ``σ_max`` as ``t`` grows (the Frobenius
  slack ``rank^(1/2^(t+1))`` is 1.05 at t = 6 for rank 512).

What the norm is, per padding mode (stride 1 first):

* ``zeros``: ``A`` is the restriction of a circular convolution on ``N = n + pad_left + pad_right``
  per dimension to inputs that vanish outside the original ``n`` (an isometric embedding) and to
  the output positions (a projection), so ``||A|| <= ||C_N||``; the bound is ``||C_N||``.
* ``circular`` with ``pad_left + pad_right = dilation·(k - 1)`` (output size = input size): ``A``
  *is* a circular convolution on ``n`` (up to a shift), and the bound is the exact norm (up to
  the Gram slack). That is the setting of Sedghi et al.
* ``reflect``, ``replicate`` and other ``circular`` paddings: ``A = C ∘ P`` where ``P`` is the
  padding map (it copies input values) and ``C`` an unpadded convolution. ``PᵀP`` is diagonal with
  the number of copies of each input value, so ``||P|| = sqrt(max copies)`` (``sqrt(2)`` per
  padded dimension for reflect/circular, ``sqrt(1 + pad)`` for replicate); the bound is
  ``||P|| · ||C_N||`` and can be loose by that factor. The power iteration is exact for every
  mode: it differentiates through the padding.
* stride ``s``: ``A_s`` keeps every s-th output of the stride-1 convolution (a projection), so
  the stride-1 bound holds; it can be loose by up to ``sqrt(Π s)``. The power iteration runs the
  strided convolution itself and is exact.
* groups: ``A`` is block-diagonal over the groups; the bound takes the max over groups.

How these differ from ``torch.nn.utils.spectral_norm``: it divides the weight by the norm of the
*reshaped kernel* ``W.reshape(C_out, -1)``, which is neither the layer's Lipschitz constant nor a
bound on it. For stride 1 the true norm can exceed it by up to ``sqrt(Πk)`` (Tsuzuku et al. 2018:
a kernel of all ones has reshaped norm ``sqrt(Πk)`` and true norm ``Πk``, the gain at frequency
0), and it can be smaller (a stride-k k×k convolution on non-overlapping patches has exactly the
reshaped norm; on small inputs the zero padding cuts off kernel taps). benchmarks/README.md
gives measured numbers for a CIFAR ResNet-18; README.md a worked example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyadvk import _checks

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d  # the layers of CONVS, as a type


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Raises ValueError when ``weight`` holds NaN or inf: no norm and no bound is defined then
    (one host sync; used by the reporting functions, which offer ``check_values=False``; without
    the check every body gives NaN for such a weight, never a finite norm)."""
    check_all_finite([(name, weight)])


def check_all_finite(named: list[tuple[str, torch.Tensor]]) -> None:
    """:func:`check_finite` for many tensors with one host sync per device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, w in named:
        by_device.setdefault(w.device, []).append((name, w.detach()))
    for group in by_device.values():
        ok = torch.stack([torch.isfinite(w).all() for _, w in group]).tolist()
        for (name, w), good in zip(group, ok):
            if not good:
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(
                    f"{name} has {bad} non-finite value(s) (NaN or inf): its norm and any Lipschitz bound "
                    "are undefined (was the training diverging?)"
                )


def _check_conv(name: str, conv: object) -> Conv:
    if not isinstance(conv, CONVS):
        raise TypeError(f"{name} must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
    return conv


def conv_dims(conv: Conv) -> int:
    return len(conv.kernel_size)


def pads(conv: Conv) -> list[tuple[int, int]]:
    """(left, right) zero/mode padding per spatial dimension, as the layer applies it."""
    d = conv_dims(conv)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [(0, 0)] * d
        out = []
        for k, dil in zip(conv.kernel_size, conv.dilation):  # 'same': extra pad on the right
            total = dil * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in conv.padding]


def output_spatial(conv: Conv, spatial: Sequence[int]) -> list[int]:
    out = []
    for n, (pl, pr), k, s, dil in zip(spatial, pads(conv), conv.kernel_size, conv.stride, conv.dilation):
        out.append((n + pl + pr - dil * (k - 1) - 1) // s + 1)
    return out


def check_input_shape(
    conv: Conv, input_shape: Sequence[int], *, name: str = "input_shape", layer: str = ""
) -> tuple[int, ...]:
    """``input_shape`` must be ``(C_in, *spatial)`` for this convolution, large enough for it."""
    d = conv_dims(conv)
    what = f"{layer + ' ' if layer else ''}({conv})"
    try:
        shape = tuple(int(s) for s in input_shape)
        ok = (
            len(shape) == d + 1
            and all(s >= 1 for s in shape)
            and all(float(s) == float(t) for s, t in zip(shape, input_shape))
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        dims = ", ".join("DHW"[3 - d :])
        raise ValueError(
            f"{name} must be (C_in, {dims}) of positive ints (no batch dim) for {what}, got {input_shape!r}"
        )
    if shape[0] != conv.in_channels:
        raise ValueError(
            f"{name} {shape} does not fit {what}: it has {shape[0]} channels, the layer takes {conv.in_channels}"
        )
    mode = conv.padding_mode
    for n, (pl, pr) in zip(shape[1:], pads(conv)):
        if mode == "reflect" and max(pl, pr) >= n or mode == "circular" and max(pl, pr) > n:
            raise ValueError(
                f"{name} {shape} does not fit {what}: {mode} padding {max(pl, pr)} needs spatial sizes "
                f"{'>' if mode == 'reflect' else '>='} it"
            )
    if min(output_spatial(conv, shape[1:])) < 1:
        ext = [dil * (k - 1) + 1 for k, dil in zip(conv.kernel_size, conv.dilation)]
        raise ValueError(
            f"{name} {shape} does not fit {what}: the padded input is smaller than the kernel extent "
            f"{tuple(ext)}, so the output would be empty"
        )
    return shape


def linear_part(conv: Conv, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's convolution without bias (padding mode included) with ``weight``."""
    return conv._conv_forward(x, weight, None)


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def adjoint(conv: Conv, u: torch.Tensor, weight: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``Aᵀ u``: the transposed convolution (the input gradient of the layer's convolution)."""
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        extra = []  # output_padding: input positions the strided forward never reached
        for n, o, k, s, p, dil in zip(
            x_shape[2:], u.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation
        ):
            extra.append(n - ((o - 1) * s - 2 * p + dil * (k - 1) + 1))
        return _CONV_T[conv_dims(conv)](
            u, weight, None, conv.stride, conv.padding, tuple(extra), conv.groups, conv.dilation
        )
    if conv.padding_mode == "circular":  # transposed valid convolution, then fold the wrap back
        p = pads(conv)
        extra = []
        for n, o, k, s, (pl, pr), dil in zip(x_shape[2:], u.shape[2:], conv.kernel_size, conv.stride, p, conv.dilation):
            extra.append(n + pl + pr - ((o - 1) * s + dil * (k - 1) + 1))
        z = _CONV_T[conv_dims(conv)](u, weight, None, conv.stride, 0, tuple(extra), conv.groups, conv.dilation)
        for axis, (n, (pl, pr)) in enumerate(zip(x_shape[2:], p)):
            dim = 2 + axis
            x = z.narrow(dim, pl, n).clone()
            if pl:
                x.narrow(dim, n - pl, pl).add_(z.narrow(dim, 0, pl))
            if pr:
                x.narrow(dim, 0, pr).add_(z.narrow(dim, pl + n, pr))
            z = x
        return z
    with torch.enable_grad():
        x = torch.zeros(x_shape, dtype=u.dtype, device=u.device, requires_grad=True)
        y = linear_part(conv, x, weight.detach())
        return torch.autograd.grad(y, x, u)[0]


def _normalize(t: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / ||t||, ||t|| as float32) with the norm and the division in float64, so entries up to
    float32's max neither overflow nor underflow (1e-30); ``fallback`` when ||t|| = 0, NaN when
    ||t|| is NaN or inf (a non-finite kernel: never a finite σ)."""
    n = torch.linalg.vector_norm(t, dtype=torch.float64)
    ok = (n > 0) & torch.isfinite(n)
    unit = (t.double() / torch.where(ok, n, 1.0)).to(t.dtype)
    return torch.where(ok, unit, torch.where(n == 0, fallback, math.nan)), n.float()


@dataclass
class ConvNormState:
    """Warm-start state of :func:`conv_operator_norm`: the right singular vector estimate ``v``
    (input-shaped, ``(1, C_in, *spatial)``, unit norm), the left one ``u`` (output-shaped) and the
    last ``sigma``. Pass it back to continue the iteration where it stopped."""

    v: torch.Tensor
    u: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    @classmethod
    def random(
        cls,
        input_shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> ConvNormState:
        """A random unit ``v``, drawn on the generator's device (CPU without one) and moved to
        ``device``: the same seed gives the same start on every device."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        source = generator.device if generator is not None else torch.device("cpu")
        v = torch.randn((1, *input_shape), generator=generator, device=source)
        return cls((v / v.norm()).to(device))


def power_step(
    conv: Conv, weight: torch.Tensor, v: torch.Tensor, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iters`` (>= 1) steps from ``v`` (float32, no grad): returns ``(sigma, u, v)`` with
    ``σ = <u, A v> = ||Aᵀu||``, u output-shaped and v input-shaped unit vectors."""
    n_iters = _checks.integer("n_iters", n_iters, low=1)
    w = weight.detach().float()
    with torch.no_grad():
        for _ in range(n_iters):
            t = linear_part(conv, v, w)
            u, _ = _normalize(t, torch.zeros_like(t))
            s = adjoint(conv, u, w, v.shape)
            v, sigma = _normalize(s, v)
    return sigma, u, v


def conv_operator_norm(
    conv: Conv,
    input_shape: Sequence[int],
    n_iters: int = 50,
    state: ConvNormState | None = None,
    *,
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, ConvNormState]:
    """The spectral norm of ``conv`` (without bias) on inputs of ``input_shape``, by power iteration.

    Args:
        conv: nn.Conv1d/2d/3d (any stride, padding and padding mode, dilation, groups).
        input_shape: ``(C_in, *spatial)``, without the batch dim.
        n_iters: iterations (>= 1), each one convolution and one transposed convolution.
        state: a :class:`ConvNormState` returned by an earlier call (warm start), or None for a
            random start (from ``generator``).
        weight: use this kernel instead of ``conv.weight`` (same shape).
        generator: the random source of a cold start (``state=None``); the same seed gives the
            same start on every device. Default: torch's global RNG.
        check_values: raise a ValueError for a NaN or inf in the kernel (one host sync); with
            False such a kernel gives σ = NaN.

    Returns:
        ``(sigma, state)``: a float32 0-dim tensor (a lower estimate that converges to the norm;
        zero for a zero kernel) and the state to pass back next time. Computed in float32 without
        autograd; see :class:`pyadvk.lipschitz.LipschitzPenalty` for a differentiable σ.
    """
    _check_conv("conv", conv)
    shape = check_input_shape(conv, input_shape)
    n_iters = _checks.integer("n_iters", n_iters, low=1)
    w = conv.weight if weight is None else weight
    if weight is not None:
        _checks.tensor("weight", weight, min_dim=3)
        if weight.shape != conv.weight.shape:
            raise ValueError(
                f"weight must have the shape of conv.weight {tuple(conv.weight.shape)}, got {tuple(weight.shape)}"
            )
    if check_values:
        check_finite("weight" if weight is not None else "conv.weight", w)
    if state is None:
        state = ConvNormState.random(shape, device=w.device, generator=generator)
    elif not isinstance(state, ConvNormState):
        raise TypeError(f"state must be a ConvNormState or None, got {type(state).__name__}")
    elif tuple(state.v.shape) != (1, *shape):
        raise ValueError(f"state holds vectors for input shape {tuple(state.v.shape[1:])}, not input_shape {shape}")
    sigma, u, v = power_step(conv, w, state.v.to(device=w.device, dtype=torch.float32), n_iters)
    state.v, state.u, state.sigma = v, u, sigma
    return sigma, state


# ---------------------------------------------------------------------------------------------
# Certified bound: Gram iteration on the frequency representation.


def _scaled_fro(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G / ||G||_F, ||G||_F) per batch matrix, without overflow (scaled by max |G| first);
    zero matrices stay zero with norm 1 (so that log-scales stay finite)."""
    a = g.abs().amax(dim=(-2, -1))
    a = torch.where(a > 0, a, torch.ones_like(a))
    g = g / a[:, None, None].to(g.dtype)
    f = torch.linalg.matrix_norm(g, ord="fro")
    f = torch.where(f > 0, f, torch.ones_like(f))
    return g / f[:, None, None].to(g.dtype), f.double() * a.double()


def gram_bound(mats: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Per-matrix upper bound on σ_max of a batch ``(B, m, n)`` (real or complex) by Gram
    iteration with rescaling: ``G <- Gᴴ G`` ``n_iters`` times, bound ``||G_T||_F^(1/2^T)`` times
    the accumulated scales. Exact to rounding for rank-1 matrices; zero matrices give 0; a matrix
    with NaN gives NaN and one with inf (and no NaN) gives inf, never a finite "bound".
    Returns float64 (B,)."""
    has_nan = torch.isnan(mats).flatten(1).any(dim=1)
    has_inf = torch.isinf(mats).flatten(1).any(dim=1)
    g = torch.where((has_nan | has_inf)[:, None, None], torch.zeros_like(mats), mats)
    if g.shape[-2] > g.shape[-1]:
        g = g.mH  # same singular values; G Gᴴ below is the smaller Gram matrix
    log_scale = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    for _ in range(n_iters):
        g, f = _scaled_fro(g)
        g = g @ g.mH
        log_scale = 2 * (log_scale + torch.log(f))
    a = g.abs().amax(dim=(-2, -1)).double()
    nonzero = a > 0
    a = torch.where(nonzero, a, torch.ones_like(a))
    fro = torch.linalg.matrix_norm(g / a[:, None, None].to(g.dtype), ord="fro").double() * a
    bound = torch.exp((torch.log(fro) + log_scale) / 2**n_iters)
    bound = torch.where(nonzero, bound, torch.zeros_like(bound))
    bound = torch.where(has_inf, torch.full_like(bound, torch.inf), bound)
    return torch.where(has_nan, torch.full_like(bound, torch.nan), bound)


def _pad_copies(n: int, left: int, right: int, mode: str) -> int:
    """The largest number of copies F.pad(mode) makes of one input value (1-D)."""
    x = torch.ones(1, 1, n, dtype=torch.float64, requires_grad=True)
    y = F.pad(x, (left, right), mode=mode)
    (g,) = torch.autograd.grad(y.sum(), x)
    return int(round(float(g.max())))


def circulant_plan(conv: Conv, spatial: Sequence[int]) -> tuple[list[int], float]:
    """(grid size N per dim, factor): ``||A|| <= factor · ||circular conv of the kernel on N||``
    (see the module docstring)."""
    p = pads(conv)
    mode = conv.padding_mode
    if (
        mode == "circular"
        and all(s == 1 for s in conv.stride)
        and all(pl + pr == dil * (k - 1) for (pl, pr), k, dil in zip(p, conv.kernel_size, conv.dilation))
    ):
        return list(spatial), 1.0
    grid = [n + pl + pr for n, (pl, pr) in zip(spatial, p)]
    if mode == "zeros":
        return grid, 1.0
    copies = 1
    for n, (pl, pr) in zip(spatial, p):
        if pl or pr:
            copies *= _pad_copies(n, pl, pr, mode)
    return grid, math.sqrt(copies)


def kernel_spectrum(weight: torch.Tensor, groups: int, dilation: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """The per-frequency matrices ``K̂(ω)`` of a (dilated) kernel zero-embedded in ``grid``:
    shape ``(groups · Π frequencies, C_out/groups, C_in/groups)``, complex64 (rfft: half of the
    last frequency axis, the other half is its complex conjugate)."""
    d = weight.dim() - 2
    c_out, c_in_g = weight.shape[:2]
    w = weight.detach()
    if w.dtype != torch.float64:
        w = w.float()
    if any(dil > 1 for dil in dilation):
        ks = [dil * (k - 1) + 1 for k, dil in zip(weight.shape[2:], dilation)]
        dil_w = w.new_zeros((c_out, c_in_g, *ks))
        every_dil = (slice(None), slice(None), *(slice(None, None, dil) for dil in dilation))
        dil_w[every_dil] = w
        w = dil_w
    for axis, size in enumerate(grid):  # a kernel wider than the grid wraps around: fold it
        dim, ext = 2 + axis, w.shape[2 + axis]
        if ext > size:
            reps = -(-ext // size)
            w = F.pad(w.movedim(dim, -1), (0, reps * size - ext))
            w = w.reshape(*w.shape[:-1], reps, size).sum(-2).movedim(-1, dim)
    dims = tuple(range(2, 2 + d))
    spec = torch.fft.rfftn(w, s=list(grid), dim=dims)  # (C_out, C_in/g, *F)
    spec = spec.reshape(groups, c_out // groups, c_in_g, -1)
    return spec.permute(0, 3, 1, 2).reshape(-1, c_out // groups, c_in_g)


def conv_norm_bound(
    conv: Conv,
    input_shape: Sequence[int],
    n_iters: int = 6,
    *,
    weight: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """A certified upper bound on the spectral norm of ``conv`` (without bias) on ``input_shape``.

    Gram iteration (``n_iters`` >= 1 steps, see :func:`gram_bound`) on the kernel's DFT over the
    grid of :func:`circulant_plan`; no convolution of an input-sized tensor is run. The bound is
    exact up to the Gram slack for circular padding with output size = input size and stride 1;
    see the module docstring for the other cases. Float32 (complex64) arithmetic: certified up to
    float32 rounding. Returns a float32 0-dim tensor. ``check_values``: raise a ValueError for a
    NaN or inf in the kernel (one host sync); with False such a kernel gives NaN or inf.
    """
    _check_conv("conv", conv)
    shape = check_input_shape(conv, input_shape)
    n_iters = _checks.integer("n_iters", n_iters, low=1)
    w = conv.weight if weight is None else weight
    if check_values:
        check_finite("weight" if weight is not None else "conv.weight", w)
    grid, factor = circulant_plan(conv, shape[1:])
    spec = kernel_spectrum(w, conv.groups, conv.dilation, grid)
    return (factor * gram_bound(spec, n_iters).max()).float()


def circular_norm_exact(conv: Conv, input_shape: Sequence[int]) -> torch.Tensor:
    """``max_ω σ_max(K̂(ω))`` by per-frequency SVD (Sedghi et al. 2019): the exact norm of the
    circular convolution of the kernel on the grid of :func:`circulant_plan` (the layer's norm
    itself for circular padding with output size = input size and stride 1). float64."""
    _check_conv("conv", conv)
    shape = check_input_shape(conv, input_shape)
    grid, _ = circulant_plan(conv, shape[1:])
    spec = kernel_spectrum(conv.weight.double(), conv.groups, conv.dilation, grid)
    return torch.linalg.matrix_norm(spec.to(torch.complex128), ord=2).max()
