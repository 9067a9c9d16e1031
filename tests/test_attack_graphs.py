"""The CUDA-graph mode of PGD and APGD keeps its captured iterations between calls
(pyadvk/attacks/_graphs.py): the cache key, one capture per key, replays equal to eager, release.
On the CPU the capture is replaced by a stand-in whose replay reruns the captured Python code
(what a replay of the real graph does on the device); the gpu tests spy on the real capture."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from pyadvk.attacks import APGD, APGDT, PGD, _graphs

CUDA = torch.cuda.is_available()


class _ReplayByRerun:
    def __init__(self, body) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()

    def pool(self) -> None:
        return None


@pytest.fixture
def captures(monkeypatch):
    """Records each capture (its device) and lets cuda_graph=True run on CPU images."""
    calls: list[torch.device] = []

    def capture(device, body, warmup=None, pool=None):
        calls.append(device)
        if warmup is not None:
            warmup()
        return _ReplayByRerun(body)

    monkeypatch.setattr(_graphs, "capture", capture)
    monkeypatch.setattr(_graphs, "check_device", lambda images: None)
    return calls


def _model(device="cpu", classes=5):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, classes)
    ).to(device)


def _batch(n, seed, device="cpu", classes=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=gen).to(device), torch.randint(0, classes, (n,), generator=gen).to(device)


PGD_KW = dict(eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_pgd_replays_across_calls_and_equals_eager(captures, decay):
    model = _model().eval()
    eager = PGD(model, decay=decay, **PGD_KW)
    graphed = PGD(model, decay=decay, cuda_graph=True, **PGD_KW)
    results = []
    for seed in range(3):
        images, labels = _batch(4, seed)
        out = graphed(images, labels)
        assert torch.equal(out, eager(images, labels)), seed
        results.append(out)
    assert len(captures) == 1 and len(graphed._graphs) == 1
    assert torch.equal(results[0], eager(*_batch(4, 0)))  # not overwritten by the later calls


def test_pgd_per_sample_eps_values_are_copied_in(captures):
    model = _model().eval()
    graphed = PGD(model, cuda_graph=True, **{**PGD_KW, "eps": torch.full((4,), 0.01)})
    images, labels = _batch(4, 1)
    for eps in (torch.full((4,), 0.01), torch.tensor([0.0, 0.02, 0.05, 0.1])):
        graphed.eps = eps
        want = PGD(model, **{**PGD_KW, "eps": eps})(images, labels)
        assert torch.equal(graphed(images, labels), want)
    assert len(captures) == 1  # same key: the new per-sample values are replayed


def test_what_makes_a_new_capture(captures):
    model = _model().eval()
    attack = PGD(model, cuda_graph=True, **PGD_KW)
    images, labels = _batch(4, 0)
    attack(images, labels)
    attack(*_batch(4, 1))
    assert len(captures) == 1
    with torch.no_grad():
        model[0].weight.add_(0.01)  # in place (an optimizer step): the replays read it
    attack(images, labels)
    assert len(captures) == 1
    new = [
        lambda: attack(*_batch(3, 0)),  # batch size
        lambda: attack(images.contiguous(memory_format=torch.channels_last), labels),  # layout
        lambda: setattr(attack, "eps", 4 / 255),  # a setting
        lambda: model[0].__setattr__("weight", nn.Parameter(model[0].weight.detach().clone())),  # new storage
        lambda: model.train(),  # a train/eval flag
    ]
    for i, change in enumerate(new):
        change()
        attack(images, labels)
        assert len(captures) == 2 + i, i
    assert len(attack._graphs) == _graphs.GRAPH_CACHE_SIZE  # the least recently used were dropped
    attack.release_graphs()
    assert len(attack._graphs) == 0
    attack(images, labels)
    assert len(captures) == 2 + len(new)


def test_graphs_are_freed_with_the_attack(monkeypatch):
    class Graph:  # like a real graph, it holds no reference to the captured Python code
        def replay(self) -> None:
            pass

    monkeypatch.setattr(_graphs, "capture", lambda device, body, warmup=None, pool=None: Graph())
    monkeypatch.setattr(_graphs, "check_device", lambda images: None)
    attack = PGD(_model().eval(), cuda_graph=True, **PGD_KW)
    attack(*_batch(4, 0))
    (entry,) = attack._graphs._entries.values()
    ref = weakref.ref(entry)
    gc.disable()  # no reference cycle may hold the entry: it goes with the attack at once
    try:
        del attack, entry
        assert ref() is None
    finally:
        gc.enable()


def test_model_key_reads_no_data():
    model = _model()
    key = _graphs.model_key(model)
    assert key == _graphs.model_key(model)
    assert _graphs.model_key(model.eval()) != key
    with torch.device("meta"):  # no data to read: the key comes from addresses, shapes, dtypes, flags
        assert _graphs.model_key(nn.Linear(3, 2))[0] == "module"
    assert _graphs.model_key(len) == ("callable", id(len))


@pytest.mark.parametrize("cls", [APGD, APGDT])
def test_apgd_replays_across_runs_and_equals_eager(captures, cls):
    model = _model().eval()
    kw = dict(norm="linf", eps=8 / 255, steps=8, seed=1)
    if cls is APGDT:
        kw["n_target_classes"] = 2
    eager, graphed = cls(model, **kw), cls(model, cuda_graph=True, **kw)
    images, labels = _batch(6, 2)
    with torch.no_grad():
        labels = model(images).argmax(1)  # every image attacked, in one run per round
    first = graphed(images, labels)
    assert torch.equal(first, eager(images, labels))
    count = len(captures)
    assert count >= 2  # two graphs per key
    assert torch.equal(graphed(images, labels), eager(images, labels))
    assert len(captures) == count  # the second call replays what the first captured


@pytest.mark.gpu
def test_pgd_capture_once_on_gpu(monkeypatch):
    calls = []
    real = _graphs.capture

    def spy(device, body, warmup=None, pool=None):
        calls.append(device)
        return real(device, body, warmup=warmup, pool=pool)

    monkeypatch.setattr(_graphs, "capture", spy)
    model = _model("cuda").eval()
    attack = PGD(model, cuda_graph=True, **PGD_KW)
    for seed in range(3):
        images, labels = _batch(8, seed, "cuda")
        torch.testing.assert_close(attack(images, labels), PGD(model, **PGD_KW)(images, labels), rtol=0, atol=1e-6)
    assert calls == [images.device]  # one capture, on the images' device
    before = torch.cuda.memory_allocated()
    attack.release_graphs()  # frees at least the captured step's static copies of the inputs
    assert torch.cuda.memory_allocated() < before


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphs_capture_on_the_images_device():
    """Images on cuda:1 while cuda:0 is current: capture and replay on cuda:1 (PGD and APGD)."""
    model = _model("cuda:1").eval()
    images, labels = _batch(8, 0, "cuda:1")
    with torch.cuda.device(0):
        for cls, kw in ((PGD, PGD_KW), (APGD, dict(eps=8 / 255, steps=6))):
            attack = cls(model, cuda_graph=True, **kw)
            eager = cls(model, **kw)(images, labels)
            for _ in range(2):
                out = attack(images, labels)
                assert out.device == images.device
                torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
