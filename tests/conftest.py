"""Test setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET must be set before anything imports triton). GPU tests are marked ``gpu`` and
skipped without a CUDA device."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyadvk  # noqa: E402
from pyadvk import _backend  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible); runs in full on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def available(op: _backend.OpBodies, device: str) -> list[str]:
    """Backends that can run ``op`` on ``device`` here."""
    return [name for name in pyadvk.BACKENDS if not op.reason(name, device)]


@pytest.fixture(autouse=True)
def _restore_backend():
    before = pyadvk.get_backend()
    yield
    pyadvk.set_backend(before)


def _with_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: for tests that run many tiny ops, which OpenMP fork/join slows down
    a hundredfold on a shared, loaded machine. Restored after the test."""
    yield from _with_threads(1)


@pytest.fixture
def two_threads():
    """Two intra-op threads (for code whose schedule depends on the thread count). Restored."""
    yield from _with_threads(2)
