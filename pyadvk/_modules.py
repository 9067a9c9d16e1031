"""Helpers on nn.Modules shared by every layer of pyadvk (a leaf: it imports nothing of pyadvk):
reading a named layer's output (name resolution with a clear error, forward hooks that capture
outputs), running models in eval mode with each module's mode restored afterwards, the device a
model lives on, and how attacks, metrics and explanations run a model: its state left exactly as
found (:func:`preserved_state`) and input gradients available under ``torch.inference_mode()``
(:func:`guarded`, :func:`ordinary`, :func:`guarded_call`)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

# ids of the modules whose state an enclosing preserved_state() already restores (nested attacks,
# such as AutoAttack's components, then copy nothing again)
_GUARDED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("pyadvk_guarded", default=frozenset())


def layer_names(model: nn.Module) -> list[str]:
    """The names ``model.named_modules()`` gives, without the root's empty name."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str, *, argument: str = "layer") -> nn.Module:
    """The submodule of ``model`` called ``name`` (as in ``model.named_modules()``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (its layers are found by name), got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a layer name (str), got {type(name).__name__} {name!r}")
    modules = dict(model.named_modules())
    if name == "" or name not in modules:
        valid = layer_names(model)
        raise ValueError(
            f"{argument} {name!r} is not a layer of {type(model).__name__}; valid names: {', '.join(valid) or '(none)'}"
        )
    return modules[name]


def layer_list(layers, *, argument: str = "layers") -> list[str]:
    """A non-empty list of distinct layer names from a name or a sequence of names."""
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"{argument} must be a layer name or a non-empty list of layer names, got {layers!r}")
    layers = list(layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"{argument} must not repeat a layer, got {layers}")
    return layers


@contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Forward hooks on the named layers; yields ``{name: [outputs in call order]}``.

    The caller clears the lists between forwards. Outputs that are not tensors raise an error.
    """
    modules = {name: resolve_layer(model, name, argument="layer") for name in layers}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook_for(name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} must output a tensor, got {type(output).__name__}")
            outputs[name].append(output)

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def single_output(outputs: dict[str, list[torch.Tensor]], name: str) -> torch.Tensor:
    """The one output the layer gave in the last forward (error if it ran 0 or several times)."""
    got = outputs[name]
    if len(got) != 1:
        raise RuntimeError(
            f"layer {name!r} ran {len(got)} times in one forward; it must run exactly once "
            "(a module reused in the forward pass has no single output)"
        )
    return got[0]


@contextmanager
def eval_mode(models: Sequence) -> Iterator[None]:
    """Puts every model in eval mode and restores each module's own train/eval mode afterwards
    (also when the body raises)."""
    saved = [(m, m.training) for model in models if isinstance(model, nn.Module) for m in model.modules()]
    try:
        for model in models:
            if isinstance(model, nn.Module):
                model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


def model_device(model) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither, or for a
    plain callable that is not an nn.Module)."""
    if not isinstance(model, nn.Module):
        return torch.device("cpu")
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _distinct_modules(models: Iterable[object]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for model in models:
        if isinstance(model, nn.Module):
            for m in model.modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


@contextmanager
def preserved_state(models: Iterable[object]) -> Iterator[None]:
    """Restores every buffer and every submodule's ``training`` flag of ``models`` on exit (also
    on an exception): a buffer written in place gets its old values back, a buffer replaced gets
    its old tensor back. Costs two copies of the buffers (not the parameters)."""
    guarded = _GUARDED.get()
    modules = [m for m in _distinct_modules(models) if id(m) not in guarded]
    if not modules:
        yield
        return
    saved = []
    with torch.no_grad():
        for m in modules:
            buffers = [(name, b, b.clone()) for name, b in m._buffers.items() if b is not None]
            saved.append((m, m.training, buffers))
    token = _GUARDED.set(guarded | {id(m) for m in modules})
    try:
        yield
    finally:
        _GUARDED.reset(token)
        with torch.no_grad():
            for m, training, buffers in saved:
                m.training = training
                for name, b, copy in buffers:
                    m._buffers[name] = b
                    b.copy_(copy)  # always: ops such as batch_norm write in place without a version bump


@contextmanager
def guarded(models: Iterable[object]) -> Iterator[None]:
    """The models' state preserved (:func:`preserved_state`) and, under ``torch.inference_mode()``,
    inference mode off and gradients on inside, so that input gradients can be taken there."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.enable_grad(), preserved_state(models):
            yield
    else:
        with preserved_state(models):
            yield


def ordinary(t: T) -> T:
    """An inference tensor (made under ``torch.inference_mode()``, which autograd cannot save)
    cloned into an ordinary one; anything else as it is. Call it inside :func:`guarded`."""
    if isinstance(t, torch.Tensor) and t.is_inference():
        return t.clone()  # type: ignore[return-value]  # T is Tensor here; mypy cannot narrow a TypeVar
    return t


def guarded_call(models: Iterable[object], fn: Callable[..., T], images, labels) -> T:
    """``fn(images, labels)`` inside :func:`guarded`, with inference-mode inputs cloned out of it."""
    with guarded(models):
        return fn(ordinary(images), ordinary(labels))
