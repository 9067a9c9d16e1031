"""Layers and parametrizations: ``HalfHuberReLU`` (and ``pyadvk.nn.functional``),
``spectral_norm`` (true operator norms of convolutions), and ``Normalize`` (per-channel input
normalization to prepend to a model that expects ``(x − mean) / std``).

Each name is imported from its module on first access (PEP 562 ``__getattr__``), so the attacks,
which import ``pyadvk.nn.normalize`` with ``import pyadvk``, do not load ``spectral_norm`` and with
it ``pyadvk.lipschitz``; ``from pyadvk.nn import X`` works for every X of ``__all__``.
``pyadvk.nn.spectral_norm`` is the function, as before, however its module was first imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from pyadvk.nn import functional as functional
    from pyadvk.nn.half_huber import HalfHuberReLU as HalfHuberReLU
    from pyadvk.nn.normalize import IMAGENET_MEAN as IMAGENET_MEAN
    from pyadvk.nn.normalize import IMAGENET_STD as IMAGENET_STD
    from pyadvk.nn.normalize import Normalize as Normalize
    from pyadvk.nn.normalize import with_normalization as with_normalization
    from pyadvk.nn.spectral_norm import ConvSpectralNorm as ConvSpectralNorm
    from pyadvk.nn.spectral_norm import spectral_norm as spectral_norm

#: Public name -> the submodule of pyadvk.nn that defines it (``functional`` is the submodule).
_HOMES = {
    "IMAGENET_MEAN": "normalize",
    "IMAGENET_STD": "normalize",
    "ConvSpectralNorm": "spectral_norm",
    "HalfHuberReLU": "half_huber",
    "Normalize": "normalize",
    "functional": "functional",
    "spectral_norm": "spectral_norm",
    "with_normalization": "normalize",
}

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConvSpectralNorm",
    "HalfHuberReLU",
    "Normalize",
    "functional",
    "spectral_norm",
    "with_normalization",
]


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first access (PEP 562); later accesses find it in globals."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    value = module if name == home and name not in _FUNCTION_MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


#: Submodules named like the function they define: the package attribute is the function.
_FUNCTION_MODULES = ("spectral_norm",)


class _Package(types.ModuleType):
    """pyadvk.nn's module type. Once a submodule is loaded, the import system sets it as an
    attribute of its package; for ``spectral_norm`` that would hide the public function whenever
    ``pyadvk.nn.spectral_norm`` (the module) is imported before the name is first read (an eager
    ``__init__`` rebound the name after the import; a lazy one cannot). The function is kept."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTION_MODULES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
