"""Helpers on nn.Modules shared by every layer of pyadvk (a leaf: it imports nothing of pyadvk):
reading a named layer's output (name resolution with a clear error, forward hooks that capture
outputs), running models in eval mode with each module's mode restored afterwards, and the device
a model lives on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


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
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
