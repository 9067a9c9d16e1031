"""pyadvk: fused kernels for adversarial robustness and interpretability in PyTorch.

``pyadvk.ops`` holds the fused ops, ``pyadvk.attacks`` the attacks built on them;
``pyadvk.backends()`` says which bodies (cuda, triton, cpp, torch) run on this machine.
"""

# ops declares the schemas and loads the compiled bodies; attacks are built on them
from pyadvk import attacks, ops
from pyadvk._backend import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    backends,
    get_backend,
    set_backend,
)

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
