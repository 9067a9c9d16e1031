"""Files from elsewhere are data: code-carrying files are refused without --trust-code, and
damaged files are reported as such before anything is used (issue 13, items 1 and 3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pyadvk import models
from pyadvk._io import CorruptFileError, check_archive, save_torch
from pyadvk.stats import NeuronStats


def _small() -> nn.Module:
    torch.manual_seed(0)
    return models.SmallCNN(1, 10, 16, width=8).eval()


class _WritesAFile(nn.Module):
    """A scripted module whose forward creates a file through torch.from_file (shared=True)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, True, 16, dtype=torch.uint8)
        return x.flatten(1)[:, :10] + 0 * t[0].float()


def _flip_middle(path, n: int = 64) -> None:
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_torchscript_is_refused_without_trust_and_never_loaded(tmp_path, monkeypatch):
    target = tmp_path / "created_by_the_model"
    path = tmp_path / "scripted.pt"
    torch.jit.script(_WritesAFile(str(target))).save(str(path))
    called = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: called.append(a))
    with pytest.raises(ValueError, match="TorchScript archive: it carries code"):
        models.load_model(path)
    assert called == [], "torch.jit.load ran on an untrusted file"
    monkeypatch.undo()
    # With trust the user gets what they asked for: the module's code runs.
    loaded = models.load_model(path, trust_code=True)
    loaded(torch.rand(1, 1, 4, 4))
    assert target.exists()


@pytest.mark.parametrize("kind", ["model", "state_dict", "torchscript"])
def test_flipped_bytes_in_a_model_file_are_reported(tmp_path, kind):
    model = _small()
    path = tmp_path / "m.pt"
    if kind == "model":
        models.save_model(model, path, "small_cnn", in_channels=1, num_classes=10, input_size=16, width=8)
    elif kind == "state_dict":
        torch.save(model.state_dict(), path)
    else:
        torch.jit.trace(model, torch.rand(1, 1, 16, 16)).save(str(path))
    check_archive(path)  # intact
    _flip_middle(path)
    with pytest.raises(CorruptFileError, match="is corrupted"):
        models.load_model(path, arch="small_cnn", trust_code=True, in_channels=1, num_classes=10, input_size=16)


def test_truncated_and_random_files(tmp_path):
    path = tmp_path / "m.pt"
    models.save_model(_small(), path, "small_cnn", in_channels=1, num_classes=10, input_size=16, width=8)
    data = open(path, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        models.load_model(tmp_path / "truncated.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError):
        models.load_model(tmp_path / "random.pt")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        models.load_model(tmp_path)


def test_flipped_checkpoint_and_statistics_files(tmp_path):
    from pyadvk.train.trainer import AdversarialTrainer

    ckpt = tmp_path / "checkpoint.pt"
    save_torch({"model": _small().state_dict(), "epoch": 3}, ckpt)
    _flip_middle(ckpt)
    trainer = AdversarialTrainer.__new__(AdversarialTrainer)
    with pytest.raises(CorruptFileError, match="checkpoint .* is corrupted"):
        trainer.load_checkpoint(str(ckpt))

    model = _small()
    stats = NeuronStats(model, layers=["features"])
    with stats, torch.no_grad():
        model(torch.rand(4, 1, 16, 16))
    path = tmp_path / "stats.pt"
    stats.save(path)
    _flip_middle(path, 16)
    with pytest.raises(CorruptFileError, match="statistics file .* is corrupted"):
        NeuronStats(model, layers=["features"]).load(path)


def test_cli_reports_a_corrupted_model_in_one_line(tmp_path):
    path = tmp_path / "m.pt"
    models.save_model(_small(), path, "small_cnn", in_channels=1, num_classes=10, input_size=16, width=8)
    _flip_middle(path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyadvk",
            "ara",
            "--model",
            str(path),
            "--data",
            "digits:8",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "is corrupted" in lines[0], out.stderr
    assert not (tmp_path / "o").exists()


def _tracked_stats(tmp_path):
    model = _small()
    stats = NeuronStats(model, layers=["features"], topk=4, quantile_buffer=8)
    with stats, torch.no_grad():
        model(torch.rand(6, 1, 16, 16))
    path = tmp_path / "stats.pt"
    stats.save(path)
    return model, stats, path


def _set(field, value):
    def tamper(s):
        s[field] = value(s[field]) if callable(value) else value

    return tamper


def _edit(field, fn):
    def tamper(s):
        t = s[field].clone()
        fn(t)
        s[field] = t

    return tamper


TAMPERINGS = {
    "count -1": (_edit("count", lambda t: t.__setitem__(0, -1)), "count, nan_count and hist must be >= 0"),
    "nan_count -1": (_edit("nan_count", lambda t: t.__setitem__(0, -1)), "must be >= 0"),
    "count not the histogram's": (_edit("count", lambda t: t.add_(1)), "histogram must sum to its count"),
    "huge count": (_edit("count", lambda t: t.fill_(2**40)), "histogram must sum"),
    "lo >= hi": (_set("lo", 5.0), "finite with lo < hi"),
    "lo NaN": (_set("lo", float("nan")), "finite with lo < hi"),
    "hi inf": (_set("hi", float("inf")), "finite with lo < hi"),
    "top-k unsorted": (_edit("topk_values", lambda t: t[:, 0].fill_(-1e30)), "sorted, largest first"),
    "top-k NaN": (_edit("topk_values", lambda t: t[:, 0].fill_(float("nan"))), "must not hold NaN"),
    "top-k position": (_edit("topk_pos", lambda t: t[:, 0].fill_(10**9)), "positions must be < spatial_size"),
    "top-k sample": (_edit("topk_sample", lambda t: t[:, 0].fill_(-5)), "must be >= 0"),
    "quantile buffer unsorted": (_edit("qbuf", lambda t: t[:, 0].fill_(-1e30)), "quantile buffer must be sorted"),
    "dtype": (_set("count", lambda t: t.float()), "count must be a torch.int64 tensor"),
    "shape": (_set("mean", lambda t: t[:-1]), "mean must have shape"),
    "hist shape": (_set("hist", lambda t: t[:, :2]), "bins >= 1"),
    "samples": (_set("samples", -1), "samples must be an int >= 0"),
    "spatial_size": (_set("spatial_size", 0), "spatial_size must be None or an int >= 1"),
    "m2 negative": (_edit("m2", lambda t: t.fill_(-1.0)), "m2 .* must be >= 0"),
    "not a tensor": (_set("maximum", [1.0, 2.0]), "maximum must be a torch.float32 tensor"),
    "missing field": (lambda s: s.pop("qbuf"), "lacks qbuf"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_a_tampered_statistics_file_is_refused_and_changes_nothing(tmp_path, name):
    model, stats, path = _tracked_stats(tmp_path)
    sd = torch.load(path, weights_only=True)
    tamper, message = TAMPERINGS[name]
    tamper(sd["states"]["features"])
    torch.save(sd, path)  # a valid archive with a bad state: the CRCs match, the content is wrong
    fresh = NeuronStats(model, layers=["features"], topk=4, quantile_buffer=8)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=message):
        fresh.load(path)
    after = fresh.state_dict()
    assert after["samples"] == before["samples"] and after["states"] == before["states"]
    # the object is still usable: tracking works and gives the untampered statistics
    with fresh, torch.no_grad():
        model(torch.rand(6, 1, 16, 16))
    assert fresh.samples == 6


def test_an_intact_statistics_file_resumes(tmp_path):
    model, stats, path = _tracked_stats(tmp_path)
    fresh = NeuronStats(model, layers=["features"], topk=4, quantile_buffer=8)
    fresh.load(path)
    a, b = fresh.state_dict()["states"]["features"], stats.state_dict()["states"]["features"]
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


class _InterruptAt(nn.Module):
    """Identity that raises KeyboardInterrupt on its n-th call (a Ctrl-C between two layers)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return x


def test_ctrl_c_between_layers_never_saves_an_inconsistent_state(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), _InterruptAt(3), nn.Conv2d(3, 2, 3), nn.ReLU())
    data = torch.rand(40, 1, 8, 8)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    stats = NeuronStats(model, layers=["1", "4"], histogram_range=(-1.0, 1.0))
    with pytest.raises(KeyboardInterrupt):
        stats.track(loader, progress=False)
    # layer "1" counted the third batch, layer "4" and the sample counter did not
    assert stats.samples == 16
    with pytest.raises(RuntimeError, match=r"interrupted mid-forward after layer\(s\) 1 counted it"):
        stats.save(tmp_path / "s.pt")
    with pytest.raises(RuntimeError, match="cannot fold another batch"):
        stats.track(loader, progress=False)
    assert not (tmp_path / "s.pt").exists()

    # the supported path: save between batches, interrupt, reload, resume = one uninterrupted pass
    model[2].n = 10**9
    whole = NeuronStats(model, layers=["1", "4"], histogram_range=(-1.0, 1.0)).track(loader, progress=False)
    first = NeuronStats(model, layers=["1", "4"], histogram_range=(-1.0, 1.0))
    first.track(loader, progress=False, max_samples=16)
    first.save(tmp_path / "s.pt")
    resumed = NeuronStats(model, layers=["1", "4"], histogram_range=(-1.0, 1.0))
    resumed.load(tmp_path / "s.pt")
    resumed.track(loader, progress=False)
    a, b = resumed.state_dict()["states"], whole.state_dict()["states"]
    for layer in ("1", "4"):
        for key in ("count", "hist", "topk_values", "topk_sample"):
            assert torch.equal(a[layer][key], b[layer][key]), (layer, key)


def test_files_that_are_not_models_get_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello world\n")
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 12)
    torch.save({"format": models.FORMAT, "state_dict": {"w": torch.ones(1)}}, tmp_path / "noarch.pt")
    for name in ("notes.txt", "random.bin"):
        with pytest.raises(ValueError, match="is not a model file torch can read") as exc:
            models.load_model(tmp_path / name)
        assert "pickled code" not in str(exc.value)
    with pytest.raises(ValueError, match="pyadvk model file without an architecture name: name it with --arch"):
        models.load_model(tmp_path / "noarch.pt")


@pytest.mark.slow  # three fresh interpreters importing torch: ~10 s
def test_a_bad_backend_in_the_environment_is_a_clear_error_not_an_import_failure():
    env = {**os.environ, "PYADVK_BACKEND": "bogus"}
    code = "import pyadvk; print('imported')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr
    assert "PYADVK_BACKEND must be one of auto, cuda, triton, cpp, torch; got 'bogus'" in out.stderr
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "pyadvk", "info"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2
    assert out.stderr.startswith("pyadvk info: error: PYADVK_BACKEND must be one of") and "Traceback" not in out.stderr
    code = (
        "import torch, pyadvk\n"
        "x = torch.rand(2, 3)\n"
        "try:\n    pyadvk.ops.pgd_step(x, x, x, eps=0.1, alpha=0.1)\n"
        "except ValueError as e:\n    print('refused:', e)\n"
        "pyadvk.set_backend('torch')\npyadvk.ops.pgd_step(x, x, x, eps=0.1, alpha=0.1)\nprint('ok')"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert "refused: PYADVK_BACKEND must be one of" in out.stdout and out.stdout.strip().endswith("ok"), out
