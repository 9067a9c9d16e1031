"""pyadvk: fused kernels for adversarial robustness and interpretability in PyTorch.

``pyadvk.ops`` holds the fused ops, ``pyadvk.attacks`` the attacks built on them;
``pyadvk.backends()`` says which bodies (cuda, triton, cpp, torch) run on this machine.
"""

from pyadvk._backend import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    backends,
    get_backend,
    set_backend,
)
from pyadvk import ops  # noqa: E402  (declares the schemas, loads the compiled bodies)
from pyadvk import attacks  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "attacks",
    "backends",
    "get_backend",
    "ops",
    "set_backend",
]
