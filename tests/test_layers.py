"""Layers point down (issue 16 item 3), checked on the source with ast: every import statement of
pyadvk/ and kernels/, at module level or inside a function.

- The bottom: the private top-level modules ``pyadvk/_*.py`` (checks, I/O, layouts, module helpers,
  the torch code an op's bodies share, the extension loader and the backend registry) import only
  each other; ``_backend`` also imports ``pyadvk.kernels``, whose availability it reports.
- Kernel modules (kernels/, installed as ``pyadvk.kernels``) are leaves above the bottom: they
  import nothing from ``pyadvk.ops`` (ops dispatch to kernels, never the reverse).
- Nothing imports another package's private names: ``pyadvk.<pkg>._x`` or ``_name`` from
  ``pyadvk.<pkg>...`` only from inside ``<pkg>``; what several packages share lives at the bottom.
- The library does not import the model zoo (``pyadvk.models``) or the commands (``pyadvk.cli``).

``KNOWN`` lists the imports that still break a rule, each with the way out; a test fails when one
is fixed, so the list only shrinks. It is empty: the kernels' shared torch code lives in
``pyadvk/_half_huber.py`` and ``pyadvk/_channel_merge.py``, the attacks' model-state helpers in
``pyadvk/_modules.py``, and ``lipschitz_bound`` asks a module for its ``lipschitz_parts()`` instead
of importing the model zoo.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KNOWN: dict[tuple[str, str], str] = {
    # (importer, imported): rule, with the way out in a comment. Empty: every rule holds.
}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["pyadvk", "kernels", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources(root: Path) -> dict[str, Path]:
    files = [*sorted((root / "pyadvk").rglob("*.py")), *sorted((root / "kernels").glob("*.py"))]
    return {_module_name(f, root): f for f in files}


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every pyadvk import in the file: ``import M`` gives M,
    ``from M import a`` gives M.a (a module or a name in M)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return [(name, line) for name, line in found if name == "pyadvk" or name.startswith("pyadvk.")]


def _top_package(name: str) -> str:
    """'pyadvk.ops.pgd' -> 'ops'; 'pyadvk._io' -> '_io'; 'pyadvk' -> ''."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_bottom(name: str) -> bool:
    top = _top_package(name)
    return top.startswith("_") and not top.startswith("__")


@functools.cache
def violations(root: Path = ROOT) -> dict[tuple[str, str], str]:
    """{(importer, imported): rule} over root/pyadvk and root/kernels."""
    sources = _sources(root)
    found: dict[tuple[str, str], str] = {}
    for module, path in sources.items():
        own = _top_package(module)
        for name, _line in _imports(module, path):
            target = name
            pkg = _top_package(target)
            if _is_bottom(module) and module != "pyadvk":
                if (
                    not _is_bottom(target)
                    and target != "pyadvk"
                    and not (module == "pyadvk._backend" and target.startswith("pyadvk.kernels"))
                ):
                    found[module, target] = "bottom module imports a package above it"
                continue
            if own == "kernels" and pkg == "ops":
                found[module, _owner(target, sources)] = "kernel imports ops"
            if own not in ("", "cli", "__main__") and pkg in ("models", "cli") and own != pkg:
                found[module, _owner(target, sources)] = (
                    "library imports the model zoo" if pkg == "models" else "library imports the commands"
                )
            private = [p for p in target.split(".")[2:] if p.startswith("_") and not p.startswith("__")]
            if private and pkg != own and not _is_bottom(target):
                found[module, target] = f"imports another package's private {'.'.join(private)}"
    return found


def _owner(name: str, sources: dict[str, Path]) -> str:
    """The module an imported name lives in ('pyadvk.ops.half_huber.constants' -> its module)."""
    while name not in sources and "." in name:
        name = name.rpartition(".")[0]
    return name


def test_layers_point_down():
    new = {k: v for k, v in violations().items() if k not in KNOWN}
    assert not new, "imports that break the layering (see this file's docstring):\n" + "\n".join(
        f"  {a} imports {b}: {why}" for (a, b), why in sorted(new.items())
    )


def test_known_exceptions_still_exist():
    """When one of KNOWN is fixed, remove it from the list (so the rule holds from then on)."""
    fixed = [pair for pair in sorted(KNOWN) if pair not in violations()]
    assert not fixed, "\n".join(f"{a} no longer imports {b}: remove it from KNOWN in {__file__}" for a, b in fixed)


def test_the_checker_sees_each_rule(tmp_path):
    """Each rule flags a planted import (the checker itself can fail)."""
    fake = tmp_path
    (fake / "pyadvk" / "ops").mkdir(parents=True)
    (fake / "pyadvk" / "stats").mkdir()
    (fake / "pyadvk" / "attacks").mkdir()
    (fake / "kernels").mkdir()
    for init in ("pyadvk", "pyadvk/ops", "pyadvk/stats", "pyadvk/attacks", "kernels"):
        (fake / init / "__init__.py").write_text("")
    (fake / "pyadvk" / "_layout.py").write_text("from pyadvk.ops import pgd\n")
    (fake / "pyadvk" / "ops" / "pgd.py").write_text("from pyadvk._layout import dense_format\n")
    (fake / "pyadvk" / "stats" / "_features.py").write_text("")
    (fake / "pyadvk" / "models.py").write_text("")
    (fake / "kernels" / "pgd.py").write_text("def f():\n    from pyadvk.ops import pgd\n")
    (fake / "pyadvk" / "attacks" / "ensemble.py").write_text(
        "from pyadvk.stats._features import eval_mode\nfrom pyadvk.ops.pgd import _helper\nfrom pyadvk import models\n"
    )
    found = violations(fake)
    assert found == {
        ("pyadvk._layout", "pyadvk.ops.pgd"): "bottom module imports a package above it",
        ("pyadvk.kernels.pgd", "pyadvk.ops.pgd"): "kernel imports ops",
        ("pyadvk.attacks.ensemble", "pyadvk.stats._features.eval_mode"): "imports another package's private _features",
        ("pyadvk.attacks.ensemble", "pyadvk.ops.pgd._helper"): "imports another package's private _helper",
        ("pyadvk.attacks.ensemble", "pyadvk.models"): "library imports the model zoo",
    }, found
