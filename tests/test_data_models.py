"""Datasets (digits, CIFAR-10 python folder, image folders) and safe model loading."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from pyadvk import data, models


def test_digits_is_the_real_dataset_in_unit_range():
    train, test = data.digits(16, "train"), data.digits(16, "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    x, y = train.tensors
    assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    assert data.digits(32, "test", channels=3).tensors[0].shape[1:] == (3, 32, 32)
    # The split is a partition, the same every time.
    all_x = data.digits(16, "all").tensors[0]
    assert torch.equal(torch.cat([train.tensors[0], test.tensors[0]]).sum(0), all_x.sum(0))
    assert torch.equal(data.digits(16, "test").tensors[1], test.tensors[1])
    with pytest.raises(ValueError, match="size must be 8, 16 or 32, got 20"):
        data.digits(20)


def _write_cifar(root, n_per_batch=4, payload=None):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arr = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(payload or {b"data": arr, b"labels": labels, b"batch_label": b"x"}, f, protocol=2)
        expected.append((name, arr, labels))
    return expected


def test_cifar10_python_folder(tmp_path):
    expected = _write_cifar(tmp_path / "cifar-10-batches-py")
    test = data.cifar10(tmp_path, "test")
    name, arr, labels = expected[-1]
    x, y = test.tensors
    assert x.shape == (4, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(arr.reshape(4, 3, 32, 32)).float() / 255)
    assert y.tolist() == labels
    assert len(data.cifar10(tmp_path, "train")) == 20
    ds, info = data.load(f"cifar10:{tmp_path}", "test")
    assert info.num_classes == 10 and info.image_shape == (3, 32, 32) and len(ds) == 4


def test_cifar10_refuses_code_and_reports_missing_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _write_cifar(tmp_path, payload={b"data": Evil(), b"labels": []})
    with pytest.raises(ValueError, match="refusing to load posix.system"):
        data.cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.cifar10(tmp_path / "nope")
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        data.cifar10(tmp_path, "train")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path)
    assert ds.classes == ("cat", "dog") and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 10, 12) and y == 1 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert data.ImageFolder(tmp_path, channels=1, size=(8, 8))[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="has no class subfolders"):
        data.ImageFolder(tmp_path / "cat")
    with pytest.raises(ValueError, match="is not a readable image"):
        data.load_image(tmp_path / "dog" / "notes.txt")
    with pytest.raises(ValueError, match="data must be 'digits'"):
        data.load("mnist:/tmp")


def _small():
    torch.manual_seed(0)
    return models.SmallCNN(1, 10, 16, width=8)


def test_model_files_load_safely(tmp_path):
    model = _small().eval()
    x = torch.rand(2, 1, 16, 16)
    expected = model(x)
    # pyadvk model file: architecture recorded, no code unpickled.
    models.save_model(model, tmp_path / "m.pt", "small_cnn", in_channels=1, num_classes=10, input_size=16, width=8)
    torch.testing.assert_close(models.load_model(tmp_path / "m.pt")(x), expected)
    # TorchScript archive: code, so only with trust_code (or its older name trust_pickle).
    torch.jit.trace(model, x).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match="is a TorchScript archive: it carries code .* --trust-code"):
        models.load_model(tmp_path / "ts.pt")
    torch.testing.assert_close(models.load_model(tmp_path / "ts.pt", trust_code=True)(x), expected)
    torch.testing.assert_close(models.load_model(tmp_path / "ts.pt", trust_pickle=True)(x), expected)
    # Bare state dict: needs the architecture.
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="bare state dict: name its architecture with --arch"):
        models.load_model(tmp_path / "sd.pt")
    loaded = models.load_model(
        tmp_path / "sd.pt", arch="small_cnn", in_channels=1, num_classes=10, input_size=16, width=8
    )
    torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(ValueError, match="do not fit arch 'small_cnn'"):
        models.load_model(tmp_path / "sd.pt", arch="small_cnn", in_channels=1, num_classes=5, input_size=16, width=8)


def test_pickled_modules_need_trust(tmp_path):
    torch.save(_small(), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="holds pickled code .* pass --trust-code"):
        models.load_model(tmp_path / "pickled.pt")
    assert isinstance(models.load_model(tmp_path / "pickled.pt", trust_pickle=True), torch.nn.Module)
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    with pytest.raises(ValueError):
        models.load_model(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        models.load_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("name, shape", [("resnet18", (2, 3, 32, 32)), ("small_cnn", (2, 1, 16, 16))])
def test_architectures(name, shape):
    kwargs = {"in_channels": shape[1], "num_classes": 7}
    model = models.build(name, **kwargs)
    assert model(torch.rand(shape)).shape == (2, 7)
    with pytest.raises(ValueError, match="arch must be one of"):
        models.build("vgg")
