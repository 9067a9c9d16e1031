"""Every ```python block of README.md and docs/*.md runs (on small CPU inputs).

Blocks run in order within a file, in one namespace per file seeded with the names the prose
assumes: a small model, a batch ``images``/``labels`` (alias ``x``/``y``), a loader, an optimizer,
``x_adv``/``g``, ``eps``/``alpha``/``steps``, ``criterion`` and ``device``. Signatures and shell
commands are in ```text blocks and are not run.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import pyadvk
from pyadvk import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _namespace() -> dict:
    torch.manual_seed(0)
    model = models.build("small_cnn", in_channels=1, num_classes=10, input_size=16).eval()
    images, labels = torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,))
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,)))
    return {
        "torch": torch,
        "F": F,
        "pyadvk": pyadvk,
        "model": model,
        "images": images,
        "labels": labels,
        "x": images.clone(),
        "y": labels.clone(),
        "x_adv": images.clone(),
        "g": torch.randn_like(images),
        "loader": torch.utils.data.DataLoader(data, batch_size=4),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
        "eps": 8 / 255,
        "alpha": 2 / 255,
        "steps": 3,
        "criterion": torch.nn.CrossEntropyLoss(),
        "device": torch.device("cpu"),
    }


CASES = [(path, blocks) for path in FILES if (blocks := _blocks(path))]


@pytest.mark.parametrize("path, blocks", CASES, ids=[str(p.relative_to(ROOT)) for p, _ in CASES])
def test_python_blocks_run(path, blocks, capsys):
    namespace = _namespace()
    for line, code in blocks:
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as exc:  # report the file and line of the block
            raise AssertionError(f"the python block at {path.relative_to(ROOT)}:{line} fails: {exc!r}") from exc


def test_every_document_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in FILES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"docs pages not linked from README.md: {missing}"
