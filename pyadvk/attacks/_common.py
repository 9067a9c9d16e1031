"""What every attack does around its algorithm, in one place:

* **one input check** (:func:`check_inputs`, :func:`check_logits`): images a float32, float16 or
  bfloat16 tensor (B, ...) with every value in ``[lower, upper]``; labels a tensor of any integer
  dtype, shape (B,), on the images' device, each in ``[0, C)`` for the model's C outputs (checked
  on the first logits the attack computes, before any loss reads them); the model's output of
  shape (B, C). Errors name the argument, the value and the expectation.
* **the model's state left exactly as found** (:func:`preserved_state`): every buffer (batch-norm
  running statistics and ``num_batches_tracked`` of a model in train mode are updated by each
  forward pass) is restored bit for bit, and every submodule's train/eval flag is put back, also
  when the attack raises. Parameters are never written (gradients are taken with respect to the
  input only).
* **inference mode** (:func:`guarded_call`): called under ``torch.inference_mode()`` (Lightning's
  ``validate``/``test``), an attack clones its inputs out of inference mode and runs under
  ``torch.inference_mode(False)``, where autograd works; its result is an ordinary tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from pyadvk import _checks

T = TypeVar("T")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# ids of the modules whose state an enclosing preserved_state() already restores (nested attacks,
# such as AutoAttack's components, then copy nothing again)
_GUARDED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("pyadvk_guarded", default=frozenset())


def check_inputs(images, labels, lower: float, upper: float) -> None:
    """Rejects bad images/labels before any work (one device sync, for the range of the images)."""
    _checks.tensor("images", images)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in LABEL_DTYPES:
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of class indices (int64, int32, ..., uint8), got {what}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},) (one per image), got {tuple(labels.shape)}")
    if labels.device != images.device:
        raise ValueError(f"labels must be on the device of images ({images.device}), got {labels.device}")
    if images.numel():
        lo_t, hi_t = torch.aminmax(images.detach())
        lo, hi = float(lo_t), float(hi_t)
        if not (lower <= lo and hi <= upper):
            raise ValueError(
                f"images must lie in [lower, upper] = [{lower}, {upper}], got values in [{lo}, {hi}]; pass "
                "lower=/upper= for another input range, or normalize=(mean, std) for a model that expects "
                "normalized inputs (images then stay in pixel space)"
            )


def check_logits(logits, labels: torch.Tensor) -> None:
    """The model's output must be (B, C) logits and every label a class index in [0, C)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape ({labels.shape[0]}, C), got {shape}")
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(
                f"labels must be class indices in [0, {logits.shape[1]}), got values in [{lo}, {hi}] (the model "
                f"returns {logits.shape[1]} logits)"
            )


def _modules(models: Iterable[object]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for model in models:
        if isinstance(model, nn.Module):
            for m in model.modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def preserved_state(models: Iterable[object]) -> Iterator[None]:
    """Restores every buffer and every submodule's ``training`` flag of ``models`` on exit (also
    on an exception): a buffer written in place gets its old values back, a buffer replaced gets
    its old tensor back. Costs two copies of the buffers (not the parameters)."""
    guarded = _GUARDED.get()
    modules = [m for m in _modules(models) if id(m) not in guarded]
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


@contextlib.contextmanager
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
        return t.clone()  # type: ignore[return-value]
    return t


def guarded_call(models: Iterable[object], fn: Callable[..., T], images, labels) -> T:
    """``fn(images, labels)`` inside :func:`guarded`, with inference-mode inputs cloned out of it."""
    with guarded(models):
        return fn(ordinary(images), ordinary(labels))
