"""Memory layouts shared by the ops (a leaf: it imports nothing of pyadvk).

Every fused body walks its operands in memory order, so they must be dense with the batch
outermost; :func:`dense_format` names the layout in which a tensor is, and the ops copy anything
else to a contiguous tensor first. Elementwise ops (half_huber) accept any dense layout
(:func:`is_dense`) as long as every operand shares it (:func:`same_layout`).
"""

from __future__ import annotations

import torch


def dense_format(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which ``t`` is dense with the batch outermost (contiguous,
    channels_last for 4-d or channels_last_3d for 5-d tensors), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is non-overlapping and dense (its values fill numel consecutive slots in some
    order of the dims: contiguous, channels_last, any permutation)."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have one shape and the same strides on every dim of size > 1."""
    return a.shape == b.shape and all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))
