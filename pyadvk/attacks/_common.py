"""What every attack does around its algorithm:

* **one input check** (:func:`check_inputs`, :func:`check_logits`, here): images a float32,
  float16 or bfloat16 tensor (B, ...) with every value in ``[lower, upper]``; labels a tensor of any
  integer dtype, shape (B,), on the images' device, each in ``[0, C)`` for the model's C outputs
  (checked on the first logits the attack computes, before any loss reads them); the model's
  output of shape (B, C). Errors name the argument, the value and the expectation.
* **the model's state left exactly as found** (:func:`pyadvk._modules.preserved_state`): every
  buffer (batch-norm running statistics and ``num_batches_tracked`` of a model in train mode are
  updated by each forward pass) is restored bit for bit, and every submodule's train/eval flag is
  put back, also when the attack raises. Parameters are never written (gradients are taken with
  respect to the input only).
* **inference mode** (:func:`pyadvk._modules.guarded_call`): called under
  ``torch.inference_mode()`` (Lightning's ``validate``/``test``), an attack clones its inputs out of
  inference mode and runs under ``torch.inference_mode(False)``, where autograd works; its result
  is an ordinary tensor.

The last two live with the other module helpers in pyadvk/_modules.py: the metrics and the
explanations run models the same way.
"""

from __future__ import annotations

import torch

from pyadvk import _checks

LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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
