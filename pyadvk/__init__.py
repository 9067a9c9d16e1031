"""pyadvk: fused kernels for adversarial robustness and interpretability in PyTorch.

``pyadvk.ops`` holds the fused ops, ``pyadvk.attacks`` the attacks built on them;
``pyadvk.backends()`` says which bodies (cuda, triton, cpp, torch) run on this machine.

Every public subpackage is one attribute away from ``import pyadvk``: ``ops``, ``attacks`` and
``stats`` are imported with the package; ``nn``, ``metrics``, ``lipschitz``, ``train``,
``explain``, ``data``, ``models``, ``distributed`` and ``integrations`` on first access
(PEP 562 ``__getattr__``), so ``import pyadvk`` stays as light as the three it needs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

# ops declares the schemas and loads the compiled bodies; attacks are built on them
from pyadvk import attacks, ops, stats
from pyadvk._backend import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    backends,
    get_backend,
    set_backend,
)

if TYPE_CHECKING:  # the lazy subpackages, for type checkers and IDEs
    from pyadvk import data as data
    from pyadvk import distributed as distributed
    from pyadvk import explain as explain
    from pyadvk import integrations as integrations
    from pyadvk import lipschitz as lipschitz
    from pyadvk import metrics as metrics
    from pyadvk import models as models
    from pyadvk import nn as nn
    from pyadvk import train as train

__version__ = "0.1.0"

#: Subpackages imported on first attribute access (``pyadvk.train`` imports ``pyadvk.train``).
LAZY_SUBMODULES = (
    "data",
    "distributed",
    "explain",
    "integrations",
    "lipschitz",
    "metrics",
    "models",
    "nn",
    "train",
)

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "attacks",
    "backends",
    "get_backend",
    "ops",
    "set_backend",
    "stats",
    *LAZY_SUBMODULES,
]


def __getattr__(name: str) -> ModuleType:
    """Imports a lazy subpackage on first access (PEP 562); later accesses find it in globals."""
    if name in LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
