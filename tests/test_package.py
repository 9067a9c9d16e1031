"""The package surface: every public subpackage one attribute away from ``import pyadvk``, loaded
lazily so that ``import pyadvk`` imports nothing more than it needs (issue 15, item 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import pyadvk

PUBLIC = ("ops", "attacks", "stats", "nn", "metrics", "lipschitz", "train", "explain", "data", "models")


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout


@pytest.mark.parametrize("name", PUBLIC + ("integrations", "distributed"))
def test_subpackage_is_an_attribute(name):
    module = getattr(pyadvk, name)
    assert isinstance(module, types.ModuleType)
    assert module.__name__ == f"pyadvk.{name}"
    assert name in dir(pyadvk)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pyadvk.nope  # noqa: B018
    assert not hasattr(pyadvk, "nope")


def test_import_pyadvk_does_not_import_the_lazy_subpackages():
    # the attacks themselves import distributed and nn.normalize (not lipschitz: tests/test_nn_package.py)
    lazy = [f"pyadvk.{n}" for n in ("metrics", "train", "explain", "data", "models", "integrations")]
    out = _fresh(
        "import json, sys, pyadvk; "
        f"lazy = {lazy!r}; "
        "print(json.dumps({'loaded': [m for m in lazy if m in sys.modules], "
        "'heavy': [m for m in ('sklearn', 'matplotlib', 'PIL', 'lightning') if m in sys.modules]}))"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"loaded": [], "heavy": []}


def test_first_access_imports_and_binds_the_subpackage():
    out = _fresh(
        "import sys, pyadvk; a = 'pyadvk.train' in sys.modules; t = pyadvk.train; "
        "print(a, 'pyadvk.train' in sys.modules, pyadvk.__dict__['train'] is t, hasattr(t, 'RobustLoss'))"
    )
    assert out.split() == ["False", "True", "True", "True"]
