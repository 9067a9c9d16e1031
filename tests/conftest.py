"""Test setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET must be set before anything imports triton). GPU tests are marked ``gpu`` and
skipped without a CUDA device; tests over ~10 s on the 2-core CPU are marked ``slow``
(``make test-fast`` leaves both out).

Hypothesis settings are profiles, chosen with ``HYPOTHESIS_PROFILE`` (test files set no
``max_examples`` of their own, except the two fuzz files' 20): ``ci`` (the default, what
``make test`` runs), ``dev`` (a few examples per property: ``make test-fast``), ``gpu`` (for the
GPU tests of a GPU session, where examples are cheap) and ``thorough`` (a nightly or pre-release
run). Every profile has no deadline
(the machine is shared and Triton's interpreter is slow) and prints the reproduction blob of a
failure. ``ci`` draws the same examples on every run (derandomized: a red CI is a change's doing,
and reruns the same way); the others draw fresh ones, and what they find becomes a fixed regression
test (as tests/test_l2_cancellation.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import pyadvk  # noqa: E402
from pyadvk import _backend  # noqa: E402

CUDA = torch.cuda.is_available()

HYPOTHESIS_PROFILES = {"dev": 8, "ci": 30, "gpu": 100, "thorough": 500}  # name: examples per property
for _name, _examples in HYPOTHESIS_PROFILES.items():
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
        derandomize=_name == "ci",
    )
_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _profile not in HYPOTHESIS_PROFILES:
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={_profile!r}: expected one of {', '.join(HYPOTHESIS_PROFILES)}")
settings.load_profile(_profile)


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
