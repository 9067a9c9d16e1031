"""pyadvk.nn imports each public name on first access (PEP 562): ``import pyadvk`` (whose attacks
import ``pyadvk.nn.normalize``) loads neither ``pyadvk.nn.spectral_norm`` nor ``pyadvk.lipschitz``,
and every ``from pyadvk.nn import X`` still gives what it gave."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import pyadvk.nn

HOMES = {
    "IMAGENET_MEAN": "normalize",
    "IMAGENET_STD": "normalize",
    "ConvSpectralNorm": "spectral_norm",
    "HalfHuberReLU": "half_huber",
    "Normalize": "normalize",
    "spectral_norm": "spectral_norm",
    "with_normalization": "normalize",
}


@pytest.mark.parametrize("name", sorted(HOMES))
def test_every_public_name_is_the_object_of_its_module(name):
    module = importlib.import_module(f"pyadvk.nn.{HOMES[name]}")
    namespace: dict = {}
    exec(f"from pyadvk.nn import {name}", namespace)
    assert namespace[name] is getattr(module, name) is getattr(pyadvk.nn, name)
    assert name in dir(pyadvk.nn)


def test_functional_is_the_submodule_and_star_import_gives_all():
    assert pyadvk.nn.functional is importlib.import_module("pyadvk.nn.functional")
    namespace: dict = {}
    exec("from pyadvk.nn import *", namespace)
    assert sorted(k for k in namespace if not k.startswith("__")) == sorted(pyadvk.nn.__all__)
    assert sorted(pyadvk.nn.__all__) == sorted([*HOMES, "functional"])


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'pyadvk.nn' has no attribute 'nope'"):
        pyadvk.nn.nope  # noqa: B018


def test_spectral_norm_stays_the_function_when_its_module_is_set_on_the_package():
    """The import system sets a loaded submodule as an attribute of its package; for
    spectral_norm (a module and the function it defines) the function is kept."""
    module = importlib.import_module("pyadvk.nn.spectral_norm")
    pyadvk.nn.spectral_norm = module  # what the import system does after loading the submodule
    assert pyadvk.nn.spectral_norm is module.spectral_norm
    pyadvk.nn.functional = pyadvk.nn.functional  # any other name is set as given
    assert pyadvk.nn.functional is importlib.import_module("pyadvk.nn.functional")


def test_fresh_import_is_light_and_a_direct_submodule_import_keeps_the_function():
    code = (
        "import json, sys, pyadvk; "
        "loaded = [m for m in ('pyadvk.lipschitz', 'pyadvk.nn.spectral_norm', 'pyadvk.nn.half_huber') "
        "if m in sys.modules]; "
        "import pyadvk.nn.spectral_norm; "
        "from pyadvk.nn import spectral_norm; "
        "print(json.dumps({'loaded': loaded, 'nn': 'pyadvk.nn' in sys.modules, "
        "'function': spectral_norm is sys.modules['pyadvk.nn.spectral_norm'].spectral_norm}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"loaded": [], "nn": True, "function": True}
