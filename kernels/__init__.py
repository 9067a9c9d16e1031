"""Triton bodies of pyadvk's ops, installed as ``pyadvk.kernels``. Importing this package
registers every Triton op (``torch.ops.pyadvk.*_triton``). Set ``TRITON_INTERPRET=1`` before the
import to run them on CPU tensors through Triton's interpreter."""

from pyadvk.kernels import apgd, boundary_projection, channel_stats, half_huber, pgd, power_iteration

__all__ = ["apgd", "boundary_projection", "channel_stats", "half_huber", "pgd", "power_iteration"]
