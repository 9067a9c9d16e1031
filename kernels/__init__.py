"""Triton bodies of pyadvk's ops, installed as ``pyadvk.kernels``. Importing this package
registers every Triton op (``torch.ops.pyadvk.*_triton``). Set ``TRITON_INTERPRET=1`` before the
import to run them on CPU tensors through Triton's interpreter."""

from pyadvk.kernels import pgd  # noqa: F401
from pyadvk.kernels import half_huber  # noqa: F401
from pyadvk.kernels import power_iteration  # noqa: F401
from pyadvk.kernels import channel_stats  # noqa: F401
