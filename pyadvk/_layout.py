"""Memory layouts shared by the ops (a leaf: it imports nothing of pyadvk).

Every fused body walks its operands in memory order, so they must be dense with the batch
outermost; :func:`dense_format` names the layout in which a tensor is, and the ops copy anything
else to a contiguous tensor first.
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
