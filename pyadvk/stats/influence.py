"""Influential neurons by prediction difference (Dong et al. 2017, after Zintgraf et al. 2017).

For a target class t and a channel n of a layer,

    PD_n(t | x) = p(t | x) − p(t | x with channel n of the layer set to 0),

with p the model's softmax. A large positive PD means the channel supports the prediction of t.
The ablations are batched: for a chunk of ``batch_channels`` channels the batch x is replicated
once per channel and a forward hook zeroes channel n in replica n only, so one forward measures
``batch_channels`` ablations of every image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import eval_mode, model_device, resolve_layer

INFLUENCE_REDUCTIONS = ("mean", "none")


@dataclass
class InfluenceResult:
    """What :func:`influential_neurons` returns.

    ``channels`` and ``pd``: the top-k channels and their prediction difference, largest PD first:
    shape (k,) with ``reduce="mean"`` (PD averaged over the images) or (B, k) with
    ``reduce="none"`` (per image). ``all_pd`` (B, C): PD of every channel on every image;
    ``probability`` (B,): p(t | x) without ablation.
    """

    layer: str
    reduce: str
    channels: torch.Tensor
    pd: torch.Tensor
    all_pd: torch.Tensor
    probability: torch.Tensor


def _targets(target, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        if target.dtype not in (torch.int64, torch.int32) or target.shape != (batch,):
            raise ValueError(
                f"target must be an int or an int64 tensor of shape ({batch},) (one class per image), "
                f"got a {target.dtype} tensor of shape {tuple(target.shape)}"
            )
        return target.to(device=device, dtype=torch.int64)
    _checks.integer("target", target, low=0)
    return torch.full((batch,), target, dtype=torch.int64, device=device)


def _target_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1).gather(1, target.view(-1, 1)).squeeze(1)


@torch.no_grad()
def influential_neurons(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    target: int | torch.Tensor,
    k: int = 10,
    batch_channels: int = 64,
    *,
    reduce: str = "mean",
) -> InfluenceResult:
    """The k channels of ``layer`` whose zeroing lowers p(target | x) the most.

    Args:
        model: a classifier returning logits (B, C); run in eval mode (modes restored afterwards,
            so batch-norm layers do not mix the replicas).
        layer: a name from ``model.named_modules()``; its output (B, C_layer, ...) has the channels
            on dim 1.
        x: images (B, ...).
        target: the class t, an int for every image or an int64 (B,) tensor per image.
        k: how many channels to return (1 <= k <= C_layer).
        batch_channels: channels ablated per forward (the forward runs on
            ``batch_channels · B`` images; lower it to save memory).
        reduce: "mean": rank channels by PD averaged over the B images; "none": rank per image.

    Returns:
        An :class:`InfluenceResult`.
    """
    module = resolve_layer(model, layer)
    _checks.tensor("x", x)
    k = _checks.integer("k", k, low=1)
    batch_channels = _checks.integer("batch_channels", batch_channels, low=1)
    reduce = _checks.choice("reduce", reduce, INFLUENCE_REDUCTIONS)
    batch = x.shape[0]
    if batch == 0:
        raise ValueError("x must hold at least one image, got an empty batch")
    device = model_device(model)
    x = x.to(device)
    target = _targets(target, batch, device)

    state: dict = {"mask": None, "shape": None}

    def hook(mod, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {layer!r} must output a tensor (B, C, ...) to ablate channels, got {shape}")
        state["shape"] = tuple(output.shape)
        mask = state["mask"]
        if mask is None:
            return None
        return output * mask.to(output.dtype).view(mask.shape + (1,) * (output.dim() - 2))

    handle = module.register_forward_hook(hook)
    try:
        with eval_mode([model]):
            logits = model(x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"model must return logits of shape ({batch}, C), got {shape}")
            if int(target.min()) < 0 or int(target.max()) >= logits.shape[1]:
                raise ValueError(
                    f"target must be class indices in [0, {logits.shape[1]}), got values in "
                    f"[{int(target.min())}, {int(target.max())}]"
                )
            if state["shape"] is None or state["shape"][0] != batch:
                raise ValueError(f"layer {layer!r} must run once on the batch of {batch} images, got {state['shape']}")
            channels = state["shape"][1]
            if k > channels:
                raise ValueError(f"k must be <= the number of channels of layer {layer!r} ({channels}), got {k}")
            base = _target_probability(logits, target)
            pd = torch.empty(batch, channels, dtype=torch.float32, device=device)
            for start in range(0, channels, batch_channels):
                count = min(batch_channels, channels - start)
                mask = torch.ones(count, batch, channels, device=device)
                mask[torch.arange(count, device=device), :, start + torch.arange(count, device=device)] = 0.0
                state["mask"] = mask.view(count * batch, channels)
                replicas = x.repeat((count,) + (1,) * (x.dim() - 1))
                ablated = _target_probability(model(replicas), target.repeat(count)).view(count, batch)
                state["mask"] = None
                pd[:, start : start + count] = base.view(batch, 1) - ablated.t()
    finally:
        handle.remove()

    if reduce == "mean":
        values, order = pd.mean(dim=0).topk(k)
    else:
        values, order = pd.topk(k, dim=1)
    return InfluenceResult(layer=layer, reduce=reduce, channels=order, pd=values, all_pd=pd, probability=base)
