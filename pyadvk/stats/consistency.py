"""The neuron-consistency analysis of Dong et al. 2017 ("Towards Interpretable Deep Neural Networks
by Leveraging Adversarial Examples"): do a neuron's top-activating images share a class, on real
images and on adversarial ones, and does a layer represent an adversarial image like its real one?

Definitions used here (neuron = one channel of the named layer):

* Image-level activation of channel n on image x: the layer output ``φ(x)[n]`` reduced over its
  spatial positions by their maximum (``reduce="max"``, default: the neuron fires somewhere) or
  their mean (``reduce="mean"``). A layer with output (B, C) has no spatial positions.
* Top-K of channel n: the K images of a set with the largest image-level activation. Ties go to the
  image seen first (earlier batch, earlier position in its batch; real before adversarial when
  both sets are ranked together).
* Labels: a real image is labelled with its true label (``real_labels="true"``, default, the
  paper's choice) or with the model's prediction (``"predicted"``); an adversarial image is always
  labelled with the class the model predicts for it.
* p_n: the distribution of the labels of channel n's top-K (a histogram over the C classes / K).
* Consistency: ``consis(n) = p_nᵀ A p_n`` with A the C×C class similarity (identity by default:
  then consis is the label purity Σ_c p_c², 1 when all K images share a class, 1/C at least).
* Adversarial fraction of channel n: the share of adversarial images in the top-K of the real and
  adversarial sets ranked together.
* Representation consistency: the mean over pairs (x, x_adv) of the cosine similarity between the
  layer's flattened outputs ``φ(x)`` and ``φ(x_adv)`` (0 for an all-zero output).

The pass streams over the loaders keeping, per channel, only a running top-K of (activation,
label, dataset index): memory is O(C·K) whatever the dataset length; no activation is stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import capture, eval_mode, model_device, resolve_layer, single_output

REDUCTIONS = ("max", "mean")
REAL_LABELS = ("true", "predicted")


@dataclass
class ConsistencyResult:
    """What :func:`consistency` measures on one layer with C channels, over ``num_classes`` classes.

    Per channel (first dim C): ``consistency_real``/``consistency_adv`` (C,) pᵀAp;
    ``label_distribution_real``/``_adv`` (C, num_classes) the p's; ``adversarial_fraction`` (C,);
    ``topk_values_*``, ``topk_labels_*``, ``topk_indices_*`` (C, K) the top-K activations (largest
    first), their labels and their dataset indices (position in the loader's order).
    ``cosine`` (N,) the per-pair cosine similarity and ``representation_consistency`` its mean
    (None when the loaders were not paired).
    """

    layer: str
    topk: int
    reduce: str
    num_classes: int
    num_real: int
    num_adv: int
    consistency_real: torch.Tensor
    consistency_adv: torch.Tensor
    label_distribution_real: torch.Tensor
    label_distribution_adv: torch.Tensor
    adversarial_fraction: torch.Tensor
    topk_values_real: torch.Tensor
    topk_labels_real: torch.Tensor
    topk_indices_real: torch.Tensor
    topk_values_adv: torch.Tensor
    topk_labels_adv: torch.Tensor
    topk_indices_adv: torch.Tensor
    cosine: torch.Tensor | None
    representation_consistency: float | None

    @property
    def num_channels(self) -> int:
        return self.consistency_real.shape[0]

    def summary(self) -> dict:
        """Means over channels (and pairs) as plain Python numbers."""
        return {
            "layer": self.layer,
            "channels": self.num_channels,
            "topk": self.topk,
            "reduce": self.reduce,
            "num_real": self.num_real,
            "num_adv": self.num_adv,
            "consistency_real": float(self.consistency_real.mean()),
            "consistency_adv": float(self.consistency_adv.mean()),
            "adversarial_fraction": float(self.adversarial_fraction.mean()),
            "representation_consistency": self.representation_consistency,
        }


class _RunningTopK:
    """Per channel, the K largest image-level activations seen so far with their labels and dataset
    indices (stable: on ties the earlier image stays)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # values, labels, indices
        self.count = 0

    def update(self, acts: torch.Tensor, labels: torch.Tensor) -> None:
        batch, channels = acts.shape
        values = acts.t()
        labels = labels.view(1, -1).expand(channels, -1)
        indices = torch.arange(self.count, self.count + batch, device=acts.device).view(1, -1).expand(channels, -1)
        if self.top is not None:
            kept_values, kept_labels, kept_indices = self.top
            if kept_values.shape[0] != channels:
                raise RuntimeError(f"the layer gave {channels} channels, earlier batches gave {kept_values.shape[0]}")
            values = torch.cat([kept_values, values], dim=1)
            labels = torch.cat([kept_labels, labels], dim=1)
            indices = torch.cat([kept_indices, indices], dim=1)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.top = (values.gather(1, order), labels.gather(1, order), indices.gather(1, order))
        self.count += batch

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, labels, indices) of the K largest per channel, each (C, K), after a batch."""
        if self.top is None:
            raise RuntimeError("no batch was seen")
        return self.top


def _check_similarity(class_similarity) -> torch.Tensor | None:
    """A validated float64 copy of the class similarity A (square, symmetric, >= 0, unit diagonal)."""
    if class_similarity is None:
        return None
    a = class_similarity
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"class_similarity must be a (C, C) tensor, got {type(a).__name__}")
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"class_similarity must be a square (C, C) matrix, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"class_similarity must be a floating tensor, got {a.dtype}")
    a = a.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError(f"class_similarity must be finite and >= 0, got minimum {float(a.min())}")
    if not torch.allclose(a, a.t(), rtol=0.0, atol=1e-6):
        raise ValueError(f"class_similarity must be symmetric, got max |A - Aᵀ| = {float((a - a.t()).abs().max())}")
    if not torch.allclose(a.diagonal(), torch.ones_like(a.diagonal()), rtol=0.0, atol=1e-6):
        raise ValueError(f"class_similarity must have a unit diagonal, got diagonal {a.diagonal().tolist()}")
    return a


def _label_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, K) labels -> (C, num_classes) histogram / K in float64."""
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    return counts / labels.shape[1]


def consistency_score(p: torch.Tensor, class_similarity: torch.Tensor | None = None) -> torch.Tensor:
    """``pᵀ A p`` per row of ``p`` (…, C); A = identity when None (then Σ_c p_c²)."""
    if class_similarity is None:
        return (p * p).sum(-1)
    return ((p @ class_similarity.to(p)) * p).sum(-1)


def image_activation(features: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """A layer output (B, C, *spatial) or (B, C) reduced over its spatial positions -> (B, C)."""
    if features.dim() < 2:
        raise ValueError(f"the layer output must have at least 2 dims (B, C, ...), got shape {tuple(features.shape)}")
    flat = features.detach().float().reshape(features.shape[0], features.shape[1], -1)
    return flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)


def _split_batch(batch, name: str, need_labels: bool):
    if isinstance(batch, torch.Tensor):
        if need_labels:
            raise ValueError(f"{name} must yield (images, labels) batches (labels are needed), got bare tensors")
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 else None
        if need_labels and not isinstance(labels, torch.Tensor):
            raise ValueError(f"{name} must yield (images, labels) batches (labels are needed)")
        return batch[0], labels
    raise TypeError(f"{name} must yield tensors or (images, labels) tuples, got {type(batch).__name__}")


class _LayerPass:
    """Runs the model on a batch and returns (logits, layer output)."""

    def __init__(
        self, model: nn.Module, layer: str, outputs, device: torch.device, num_classes: int | None = None
    ) -> None:
        self.model, self.layer, self.outputs, self.device = model, layer, outputs, device
        self.expected_classes = num_classes
        self.num_classes: int | None = None

    def __call__(self, images: torch.Tensor):
        self.outputs[self.layer].clear()
        logits = self.model(images.to(self.device))
        features = single_output(self.outputs, self.layer)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape ({images.shape[0]}, C), got {shape}")
        if self.num_classes is None:
            if self.expected_classes is not None and logits.shape[1] != self.expected_classes:
                raise ValueError(
                    f"class_similarity must be ({logits.shape[1]}, {logits.shape[1]}) for a model with "
                    f"{logits.shape[1]} classes, got ({self.expected_classes}, {self.expected_classes})"
                )
            self.num_classes = logits.shape[1]
        if features.dim() < 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"layer {self.layer!r} must output (B, C, ...) with B = {images.shape[0]} images, "
                f"got shape {tuple(features.shape)}"
            )
        return logits, features


def _check_labels(labels: torch.Tensor, num_classes: int, batch: int, name: str) -> torch.Tensor:
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (batch,):
        raise ValueError(
            f"{name} labels must be int64 class indices of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _activations(features: torch.Tensor, reduce: str, layer: str) -> torch.Tensor:
    acts = image_activation(features, reduce)
    if bool(torch.isnan(acts).any()):
        raise ValueError(f"layer {layer!r} gave NaN activations; the ranking of its images is undefined")
    return acts


def cosine_similarity(features: torch.Tensor, features_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of the flattened layer outputs, (B,); 0 for an all-zero output."""
    a = features.detach().float().reshape(features.shape[0], -1)
    b = features_adv.detach().float().reshape(features_adv.shape[0], -1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


@torch.no_grad()
def representation_consistency(
    model: nn.Module, layer: str, x: torch.Tensor, x_adv: torch.Tensor, *, batch_size: int = 256
) -> float:
    """Mean cosine similarity between the layer's flattened outputs on ``x`` and on ``x_adv``
    (pairs by position), with the model in eval mode (its modes are restored afterwards)."""
    resolve_layer(model, layer)
    _checks.tensor("x", x)
    _checks.like("x_adv", x_adv, "x", x, dtype=False)
    batch_size = _checks.integer("batch_size", batch_size, low=1)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one image, got an empty batch")
    total = 0.0
    device = model_device(model)
    with eval_mode([model]), capture(model, [layer]) as outputs:
        run = _LayerPass(model, layer, outputs, device)
        for start in range(0, x.shape[0], batch_size):
            _, f = run(x[start : start + batch_size])
            _, f_adv = run(x_adv[start : start + batch_size])
            total += float(cosine_similarity(f, f_adv).double().sum())
    return total / x.shape[0]


@torch.no_grad()
def consistency(
    model: nn.Module,
    layer: str,
    real_loader: Iterable,
    adv_loader: Iterable,
    topk: int = 20,
    class_similarity: torch.Tensor | None = None,
    reduce: str = "max",
    *,
    real_labels: str = "true",
    paired: bool = True,
) -> ConsistencyResult:
    """Neuron consistency of one layer on real and adversarial images (Dong et al. 2017).

    Args:
        model: a classifier returning logits (B, num_classes); run in eval mode, modes restored.
        layer: a name from ``model.named_modules()``; its channels (dim 1) are the neurons.
        real_loader: yields ``(images, labels)`` (true labels).
        adv_loader: yields ``(adv_images, ...)`` or bare adversarial image tensors; any labels it
            yields are ignored (adversarial images are labelled with the model's prediction).
        topk: K, the number of top-activating images per neuron (each set must hold at least K).
        class_similarity: A, (num_classes, num_classes), symmetric, >= 0, unit diagonal; default
            identity.
        reduce: "max" or "mean": how a channel's spatial map becomes one activation per image.
        real_labels: "true" (the loader's labels) or "predicted" (the model's prediction).
        paired: the two loaders yield the same images in the same order, real and adversarial
            (e.g. ``adv_loader`` made from ``real_loader`` without shuffling); they are read in
            lockstep, every pair of batches must have the same size and both must end together,
            and the representation consistency is measured. With ``paired=False`` the sets may
            differ and ``representation_consistency`` is None.

    Returns:
        A :class:`ConsistencyResult` (see the module docstring for the definitions).
    """
    resolve_layer(model, layer)
    topk = _checks.integer("topk", topk, low=1)
    reduce = _checks.choice("reduce", reduce, REDUCTIONS)
    real_labels = _checks.choice("real_labels", real_labels, REAL_LABELS)
    if not isinstance(paired, bool):
        raise TypeError(f"paired must be a bool, got {type(paired).__name__}")
    a = _check_similarity(class_similarity)
    device = model_device(model)
    real_top, adv_top = _RunningTopK(topk), _RunningTopK(topk)
    cosines: list[torch.Tensor] = []

    with eval_mode([model]), capture(model, [layer]) as outputs:
        run = _LayerPass(model, layer, outputs, device, None if a is None else a.shape[0])

        def real_step(batch):
            images, labels = _split_batch(batch, "real_loader", need_labels=real_labels == "true")
            logits, features = run(images)
            if real_labels == "true":
                labels = _check_labels(labels.to(device), logits.shape[1], images.shape[0], "real_loader")
            else:
                labels = logits.argmax(dim=1)
            real_top.update(_activations(features, reduce, layer), labels)
            return features

        def adv_step(batch):
            images, _ = _split_batch(batch, "adv_loader", need_labels=False)
            logits, features = run(images)
            adv_top.update(_activations(features, reduce, layer), logits.argmax(dim=1))
            return features

        if paired:
            real_iter, adv_iter = iter(real_loader), iter(adv_loader)
            while True:
                real_batch, adv_batch = next(real_iter, None), next(adv_iter, None)
                if real_batch is None or adv_batch is None:
                    if real_batch is not None or adv_batch is not None:
                        longer = "real_loader" if real_batch is not None else "adv_loader"
                        raise ValueError(
                            f"paired loaders must have the same length: {longer} has more batches "
                            f"(after {real_top.count} pairs); pass paired=False for unpaired sets"
                        )
                    break
                f_real = real_step(real_batch)
                f_adv = adv_step(adv_batch)
                if f_real.shape != f_adv.shape:
                    raise ValueError(
                        f"paired batches must match: real batch gave layer output {tuple(f_real.shape)}, "
                        f"adversarial batch {tuple(f_adv.shape)} (after {real_top.count - f_real.shape[0]} pairs)"
                    )
                cosines.append(cosine_similarity(f_real, f_adv).cpu())
        else:
            for batch in real_loader:
                real_step(batch)
            for batch in adv_loader:
                adv_step(batch)
        num_classes = run.num_classes

    for name, top in (("real_loader", real_top), ("adv_loader", adv_top)):
        if top.count < topk:
            raise ValueError(f"topk must be <= the number of images in {name} ({top.count}), got {topk}")
    assert num_classes is not None  # set by the first batch, and both loaders had images
    real_top_values, real_top_labels, real_top_indices = real_top.result()
    adv_top_values, adv_top_labels, adv_top_indices = adv_top.result()
    p_real = _label_distribution(real_top_labels, num_classes)
    p_adv = _label_distribution(adv_top_labels, num_classes)

    both = torch.cat([real_top_values, adv_top_values], dim=1)
    is_adv = torch.cat([torch.zeros_like(real_top_values), torch.ones_like(adv_top_values)], dim=1)
    order = torch.sort(both, dim=1, descending=True, stable=True).indices[:, :topk]
    fraction = is_adv.gather(1, order).double().mean(dim=1)

    cosine = torch.cat(cosines) if paired else None
    return ConsistencyResult(
        layer=layer,
        topk=topk,
        reduce=reduce,
        num_classes=num_classes,
        num_real=real_top.count,
        num_adv=adv_top.count,
        consistency_real=consistency_score(p_real, a),
        consistency_adv=consistency_score(p_adv, a),
        label_distribution_real=p_real,
        label_distribution_adv=p_adv,
        adversarial_fraction=fraction,
        topk_values_real=real_top_values,
        topk_labels_real=real_top_labels,
        topk_indices_real=real_top_indices,
        topk_values_adv=adv_top_values,
        topk_labels_adv=adv_top_labels,
        topk_indices_adv=adv_top_indices,
        cosine=cosine,
        representation_consistency=float(cosine.double().mean()) if cosine is not None else None,
    )
