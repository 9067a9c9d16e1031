"""Model-level spectral norms, Lipschitz bounds and a Lipschitz penalty for training.

Layers: every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of a model, named as in ``named_modules()``.
The norms ignore biases (they do not change a Lipschitz constant). Three methods:

* ``"reshaped"``: the spectral norm of ``W.reshape(C_out, -1)`` for every layer, one batched
  :func:`pyadvk.ops.power_iteration` call per step for the whole model (what
  ``torch.nn.utils.spectral_norm`` normalizes by). For a convolution it is *not* the layer's
  Lipschitz constant (see :mod:`pyadvk.lipschitz.conv`).
* ``"power"``: the true operator norm: Linear layers by the batched op, convolutions by power
  iteration with the convolution and its transpose on the layer's actual input shape
  (:func:`~pyadvk.lipschitz.conv.conv_operator_norm`). Estimates from below; converges.
* ``"gram"``: certified upper bounds by Gram iteration (convolutions: on the kernel's frequency
  representation, :func:`~pyadvk.lipschitz.conv.conv_norm_bound`; Linear: on the matrix).

Warm starts: the power methods keep their singular-vector estimates between calls in a
:class:`SpectralNormState`. :func:`spectral_norms` takes one explicitly (``state=``) or, by default,
keeps one per (model, method, input shape) in a weak-keyed cache (dropped with the model; see
:func:`clear_state`), so calling it once per training step does ``n_iters`` warm-started
iterations each time.

Lipschitz bound rules (:func:`lipschitz_bound`; every rule is an upper bound in the 2-norm):

* composition (``nn.Sequential``): product;
* Linear / Conv: the layer's norm (bias ignored);
* a module that describes its forward with a method ``lipschitz_parts()`` returning a
  :class:`LipschitzParts` ``(branch, shortcut, activation)`` of child names, its forward being
  ``activation(branch(x) + shortcut(x))`` with ``branch`` the composition of its children in
  order: ``L(activation) · (L(branch) + L(shortcut))`` with ``L(branch)`` the product; no
  shortcut (None) leaves ``L(branch)``, no activation (None) counts 1, an identity shortcut
  (``nn.Sequential()``, ``nn.Identity()``) counts 1, so ``1 + branch bound``. The models of
  :mod:`pyadvk.models` describe themselves so (SmallCNN and ResNet as compositions, BasicBlock
  and Bottleneck as residual blocks); any other module can too (the bound does not import them);
* BatchNorm (eval-mode function, running statistics): ``max |γ / sqrt(running_var + eps)|``;
* ReLU, ReLU6, Hardtanh, Tanh, Softplus, HalfHuberReLU, Identity, Flatten, Dropout (eval): 1;
  LeakyReLU: ``max(1, |slope|)``; ELU/CELU: ``max(1, α)``; Sigmoid: 1/4; GELU: 1.129; SiLU: 1.1;
* MaxPool (kernel k, stride s, dilation d): ``sqrt(Π c)`` with ``c = min(k, ceil(((k-1)d+1)/s))``
  windows covering an input value per dim; AvgPool: ``sqrt(Π c / Π k)`` (``sqrt(Π c)`` when
  padded cells are left out of the average, ``sqrt(Π c · Π k) / divisor_override`` with an
  override); AdaptiveAvgPool: ``sqrt(Π c_max / s_min)`` over its regions; AdaptiveMaxPool:
  ``sqrt(Π c_max)``.

Any other module raises a TypeError naming it (the bound cannot know what its forward does).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from operator import methodcaller
from typing import NamedTuple

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import eval_mode
from pyadvk.lipschitz import conv as conv_norms
from pyadvk.ops import power_iteration as _power_iteration_fn  # the function
from pyadvk.ops.power_iteration import as_matrix, random_unit_vectors

METHODS = ("power", "gram", "reshaped")
LAYERS = (nn.Linear,) + conv_norms.CONVS
DEFAULT_ITERS = {"power": 20, "reshaped": 20, "gram": 6}


def layers_of(model: nn.Module) -> list[tuple[str, nn.Linear | conv_norms.Conv]]:
    """Every Linear and Conv layer of ``model`` (named); a clear error when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]
    if not found:
        raise ValueError(
            f"model ({type(model).__name__}) has no nn.Linear or nn.Conv1d/2d/3d layer: there is no "
            "spectral norm to compute"
        )
    return found


def input_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[nn.Module, tuple[int, ...]]:
    """The input shape (no batch dim) each submodule sees when ``model`` runs on a zero batch of
    shape ``(1, *input_shape)`` (in eval mode: BatchNorm statistics are left untouched)."""
    shape = _check_shape(input_shape)
    seen: dict[nn.Module, tuple[int, ...]] = {}

    def hook(module, args):
        if module not in seen and args and isinstance(args[0], torch.Tensor):
            seen[module] = tuple(args[0].shape[1:])

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with eval_mode([model]), torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    except Exception as exc:  # the model's own error says what does not fit
        raise ValueError(
            f"input_shape {shape} does not fit the model ({type(model).__name__}): its forward on a "
            f"zero batch of shape {(1, *shape)} failed with {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return seen


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
        ok = len(shape) >= 1 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"input_shape must be a tuple of positive ints without the batch dim, got {input_shape!r}")
    return shape


class SpectralNormState:
    """Warm-start state of :func:`spectral_norms`: per layer name, the left singular vector of
    the weight matrix (``us``) and, for convolutions under ``"power"``, a
    :class:`~pyadvk.lipschitz.conv.ConvNormState`. ``generator`` draws the cold starts (random
    unit vectors, the same on every device for one seed; default: torch's global RNG)."""

    def __init__(self, generator: torch.Generator | None = None):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.us: dict[str, torch.Tensor] = {}
        self.convs: dict[str, conv_norms.ConvNormState] = {}
        self.generator = generator

    def u_for(self, name: str, w: torch.Tensor) -> torch.Tensor:
        u = self.us.get(name)
        if u is None or u.shape != (w.shape[0],) or u.device != w.device:
            u = random_unit_vectors([w.shape[0]], w.device, self.generator)[0]
        return u


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def clear_state(model: nn.Module) -> None:
    """Forgets the cached warm-start state of ``model`` (the next call starts cold)."""
    _CACHE.pop(model, None)


def _matrix_norms(items: list[tuple[str, torch.Tensor]], state: SpectralNormState, n_iters: int):
    """Batched power iteration on (name, matrix) pairs, grouped by (device, dtype)."""
    out = {}
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, w in items:
        groups.setdefault((w.device, w.dtype), []).append((name, w))
    for group in groups.values():
        mats = [as_matrix(f"weight of {n}", w) for n, w in group]
        us = [state.u_for(n, m) for (n, _), m in zip(group, mats)]
        sigmas, us, _ = _power_iteration_fn(mats, us, n_iters)
        for i, (n, _) in enumerate(group):
            state.us[n] = us[i]
            out[n] = sigmas[i]
    return out


def spectral_norms(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    method: str = "power",
    n_iters: int | None = None,
    *,
    state: SpectralNormState | None = None,
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> OrderedDict[str, torch.Tensor]:
    """Layer name -> σ (float32 0-dim tensor) for every Linear and Conv layer of ``model``.

    Args:
        model: any module with at least one Linear/Conv layer.
        input_shape: the model's input shape without the batch dim; needed for convolutions
            with ``"power"`` and ``"gram"`` (each layer's input shape is found by one forward).
        method: ``"power"`` (true norms, power iteration), ``"gram"`` (certified upper bounds)
            or ``"reshaped"`` (norms of the reshaped kernels); see the module docstring.
        n_iters: power iterations this call (default 20) or Gram steps (default 6).
        state: warm-start state to use and update; default: the model's cached state (created
            at the first call, a cold start from ``generator``).
        generator: the random source of a cold start (``state=None`` and nothing cached yet):
            the same seed gives the same norms on every device and body. Default: torch's global
            RNG. A :class:`SpectralNormState` carries its own.
        check_values: raise a ValueError naming the layer for a NaN or inf weight (one host sync
            per call); with False no check runs (no host sync with a warm state: a training step
            can call it, and it can be captured in a CUDA graph) and such a layer's σ is NaN.
    """
    method = _checks.choice("method", method, METHODS)
    n_iters = _checks.integer("n_iters", DEFAULT_ITERS[method] if n_iters is None else n_iters, low=1)
    layers = layers_of(model)
    if check_values:
        conv_norms.check_all_finite([(f"layer {name!r}'s weight", m.weight) for name, m in layers])
    has_conv = any(isinstance(m, conv_norms.CONVS) for _, m in layers)
    shapes = {}
    if has_conv and method != "reshaped":
        if input_shape is None:
            raise ValueError(
                f"input_shape is needed for method={method!r}: the norm of a convolution depends on its input size"
            )
        shapes = input_shapes(model, input_shape)
    if state is None:
        key = (method, None if input_shape is None else tuple(input_shape))
        cached = _CACHE.setdefault(model, {})
        if key not in cached:
            cached[key] = SpectralNormState(generator)
        state = cached[key]
    elif not isinstance(state, SpectralNormState):
        raise TypeError(f"state must be a SpectralNormState or None, got {type(state).__name__}")
    elif generator is not None:
        raise ValueError("generator seeds a cold start (state=None); a SpectralNormState carries its own generator")
    out: dict[str, torch.Tensor] = {}
    if method == "reshaped":
        out = _matrix_norms([(n, m.weight) for n, m in layers], state, n_iters)
    elif method == "power":
        out = _matrix_norms([(n, m.weight) for n, m in layers if isinstance(m, nn.Linear)], state, n_iters)
        for name, m in layers:
            if isinstance(m, conv_norms.CONVS):
                if m not in shapes:
                    raise ValueError(f"layer {name!r} is not used by the model's forward: no input shape")
                sigma, state.convs[name] = conv_norms.conv_operator_norm(
                    m,
                    shapes[m],
                    n_iters,
                    state.convs.get(name) if _fits(state.convs.get(name), shapes[m]) else None,
                    generator=state.generator,
                    check_values=False,  # checked above for every layer at once (or not asked)
                )
                out[name] = sigma
    else:
        for name, m in layers:
            if isinstance(m, nn.Linear):
                out[name] = conv_norms.gram_bound(m.weight.detach().float()[None], n_iters)[0].float()
            else:
                if m not in shapes:
                    raise ValueError(f"layer {name!r} is not used by the model's forward: no input shape")
                out[name] = conv_norms.conv_norm_bound(m, shapes[m], n_iters, check_values=False)
    return OrderedDict((n, out[n]) for n, _ in layers)


def _fits(s, shape) -> bool:
    return s is not None and tuple(s.v.shape[1:]) == tuple(shape)


# ---------------------------------------------------------------------------------------------
# Lipschitz bound of a whole model.

GELU_LIP = 1.129  # max of d/dx xΦ(x) = Φ(√2) + √2 φ(√2) = 1.1289...
SILU_LIP = 1.1  # max of d/dx x σ(x) = 1.0998... at x = 2.3994


def _activation_bound(m: nn.Module) -> float | None:
    if isinstance(
        m,
        (
            nn.ReLU,
            nn.ReLU6,
            nn.Hardtanh,
            nn.Tanh,
            nn.Softplus,
            nn.Identity,
            nn.Flatten,
            nn.Dropout,
            nn.Dropout1d,
            nn.Dropout2d,
            nn.Dropout3d,
        ),
    ):
        return 1.0
    if type(m).__name__ == "HalfHuberReLU":  # pyadvk.nn: slope in [0, 1]
        return 1.0
    if isinstance(m, nn.LeakyReLU):
        return max(1.0, abs(m.negative_slope))
    if isinstance(m, (nn.ELU, nn.CELU)):
        return max(1.0, float(m.alpha))
    if isinstance(m, nn.Sigmoid):
        return 0.25
    if isinstance(m, nn.GELU):
        return GELU_LIP
    if isinstance(m, nn.SiLU):
        return SILU_LIP
    return None


def _bn_bound(name: str, m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    if m.running_var is None:
        raise ValueError(
            f"BatchNorm {name!r} keeps no running statistics (track_running_stats=False): "
            "its eval-mode scale is not fixed, so it cannot be bounded"
        )
    scale = torch.rsqrt(m.running_var.detach().float() + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.detach().float().abs()
    return scale.max()


def _tuple(v, d):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def _pool_bound(m: nn.Module, in_shape) -> float | None:
    cls = type(m).__name__
    d = {"1d": 1, "2d": 2, "3d": 3}.get(cls[-2:])
    if d is None:
        return None
    if cls.startswith(("MaxPool", "AvgPool")):
        k = _tuple(m.kernel_size, d)
        s = _tuple(m.stride if m.stride is not None else m.kernel_size, d)
        dil = _tuple(getattr(m, "dilation", 1), d)
        copies = math.prod(min(ki, math.ceil(((ki - 1) * di + 1) / si)) for ki, si, di in zip(k, s, dil))
        if cls.startswith("MaxPool"):
            return math.sqrt(copies)
        pad = _tuple(m.padding, d)
        divisor = getattr(m, "divisor_override", None)
        if divisor:
            return math.sqrt(copies * math.prod(k)) / divisor
        if m.count_include_pad or not any(pad):
            return math.sqrt(copies / math.prod(k))
        return math.sqrt(copies)
    if cls.startswith(("AdaptiveAvgPool", "AdaptiveMaxPool")):
        spatial = in_shape[-d:]
        outs = _tuple(m.output_size, d)
        copies, smallest = 1, 1
        for n, o in zip(spatial, outs):
            o = n if o is None else o
            count = [0] * n
            sizes = []
            for i in range(o):
                a, b = (i * n) // o, -((-(i + 1) * n) // o)
                sizes.append(b - a)
                for j in range(a, b):
                    count[j] += 1
            copies *= max(count)
            smallest *= min(sizes)
        return math.sqrt(copies / smallest) if cls.startswith("AdaptiveAvg") else math.sqrt(copies)
    return None


class LipschitzParts(NamedTuple):
    """How a module's forward composes its children, for :func:`lipschitz_bound`: the forward is
    ``activation(branch(x) + shortcut(x))``, ``branch`` applying the children named in ``branch``
    one after the other (first name first). ``shortcut=None``: no skip connection (the forward is
    ``activation(branch(x))``); ``activation=None``: none after the sum. A module returns one from
    its method ``lipschitz_parts()``; every name is an attribute holding an ``nn.Module``.

    Example, a residual block ``relu(bn(conv(x)) + x)`` with ``self.skip = nn.Identity()``::

        def lipschitz_parts(self):
            return LipschitzParts(branch=("conv", "bn"), shortcut="skip", activation="relu")
    """

    branch: tuple[str, ...]
    shortcut: str | None = None
    activation: str | None = None


def _parts_of(m: nn.Module, name: str) -> LipschitzParts:
    """``m.lipschitz_parts()`` checked: names of child modules, in the shape of LipschitzParts."""
    where = f"{name or '(model)'!r} ({type(m).__name__})"
    parts = methodcaller("lipschitz_parts")(m)  # a method of m's class (the caller checked), unknown to nn.Module
    try:
        branch, shortcut, activation = parts
        ok = not isinstance(branch, str) and all(isinstance(n, str) for n in branch)
        ok = ok and all(n is None or isinstance(n, str) for n in (shortcut, activation))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(
            f"lipschitz_parts() of module {where} must return a pyadvk.lipschitz.LipschitzParts(branch, shortcut, "
            f"activation): a sequence of child names, then a name or None twice; got {parts!r}"
        )
    names = [*branch, *(n for n in (shortcut, activation) if n is not None)]
    for n in names:
        if not isinstance(getattr(m, n, None), nn.Module):
            raise TypeError(
                f"lipschitz_parts() of module {where} names {n!r}, which is not a child module of it "
                f"(got {type(getattr(m, n, None)).__name__})"
            )
    return LipschitzParts(tuple(branch), shortcut, activation)


def _bound(m: nn.Module, name: str, norms: dict, shapes: dict) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32)

    def child(sub, sub_name):
        return _bound(sub, f"{name}.{sub_name}" if name else sub_name, norms, shapes)

    def product(pairs):
        total = one
        for sub_name, sub in pairs:
            total = total * child(sub, sub_name).to(total.device)
        return total

    if isinstance(m, LAYERS):
        return norms[m]
    if callable(getattr(m, "lipschitz_parts", None)):
        parts = _parts_of(m, name)
        total = product((n, getattr(m, n)) for n in parts.branch)
        if parts.shortcut is not None:
            total = total + child(getattr(m, parts.shortcut), parts.shortcut).to(total.device)
        if parts.activation is not None:
            total = child(getattr(m, parts.activation), parts.activation).to(total.device) * total
        return total
    if isinstance(m, nn.Sequential):
        return product(m.named_children())
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _bn_bound(name, m)
    act = _activation_bound(m)
    if act is not None:
        return one * act
    if m in shapes:
        pool = _pool_bound(m, shapes[m])
        if pool is not None:
            return one * pool
    raise TypeError(
        f"cannot bound module {name or '(model)'!r} of type {type(m).__name__}: lipschitz_bound knows "
        "nn.Sequential, Linear/Conv, BatchNorm (eval), the usual activations, pooling and modules that "
        "describe their children with lipschitz_parts() (pyadvk.models' SmallCNN, ResNet and their blocks); "
        "see pyadvk.lipschitz.model for the rules"
    )


def lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    method: str = "gram",
    n_iters: int | None = None,
    *,
    state: SpectralNormState | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An upper bound on the 2-norm Lipschitz constant of ``model``'s eval-mode function on
    inputs of ``input_shape`` (no batch dim), from per-layer norms and the rules of the module
    docstring. ``method="gram"`` (default) makes the bound certified; ``"power"`` uses
    converging lower estimates of each layer norm (a close estimate of the same product, not
    certified); ``"reshaped"`` uses the reshaped-kernel norms, which are not convolution norms (for
    comparison only). Returns a float32 0-dim tensor. ``state`` and ``generator`` are those of
    :func:`spectral_norms` (the warm start of the power methods, and the seed of a cold one).

    Cost: ``"gram"`` does ``#frequencies × C³`` work per Gram step and layer (114 s for a CIFAR
    ResNet-18 on a loaded 2-core CPU, see benchmarks/README.md); ``"power"`` one convolution and
    one transposed convolution of a single input per layer and iteration."""
    method = _checks.choice("method", method, METHODS)
    shape = _check_shape(input_shape)
    names = dict(layers_of(model))
    shapes = input_shapes(model, shape)
    by_name = spectral_norms(model, shape, method, n_iters, state=state, generator=generator)
    norms = {names[n]: s for n, s in by_name.items()}
    return _bound(model, "", norms, shapes)
