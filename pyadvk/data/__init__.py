"""Datasets: images as float32 tensors in [0, 1] of shape (C, H, W), labels as int64.

* :func:`digits`: scikit-learn's handwritten digits (1,797 real 8×8 scans of 10 classes, shipped
  inside scikit-learn, no download), upsampled to 16×16 or 32×32. The demo's default.
* :func:`cifar10`: the standard CIFAR-10 python folder (``cifar-10-batches-py``). Its batches are
  pickles; they are read with an unpickler that only admits numpy arrays, lists and dicts, so a
  file that is not a CIFAR batch cannot run code.
* :class:`ImageFolder`: ``root/<class name>/<image files>``, loaded lazily with Pillow.
* :func:`load`: the ``--data`` specifications of the command line: ``digits``, ``digits:32``,
  ``cifar10:PATH``, ``folder:PATH``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class DataInfo:
    """What a dataset holds: class names (their count is the number of classes) and image shape."""

    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_indices(n: int, split: str, test_fraction: float, seed: int) -> torch.Tensor:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    if split == "all":
        return torch.arange(n)
    return order[:n_test].sort().values if split == "test" else order[n_test:].sort().values


def digits(
    size: int = 16, split: str = "train", *, channels: int = 1, test_fraction: float = 0.2, seed: int = 0
) -> TensorDataset:
    """scikit-learn's handwritten digits as (channels, size, size) images in [0, 1].

    The 8×8 scans (values 0..16) are divided by 16 and upsampled bilinearly to ``size``. The
    train/test split is a seeded permutation (``test_fraction`` of the 1,797 images go to test).
    """
    from sklearn.datasets import load_digits

    if size not in (8, 16, 32):
        raise ValueError(f"size must be 8, 16 or 32, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    images = images.expand(-1, channels, -1, -1).contiguous()
    labels = torch.from_numpy(raw.target.astype(np.int64))
    idx = _split_indices(len(labels), split, test_fraction, seed)
    return TensorDataset(images[idx], labels[idx])


DIGITS_CLASSES = tuple(str(i) for i in range(10))


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch contains: numpy arrays (and builtin containers)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays and lists"
        )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no b'data'/b'labels' entries)")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {labels.shape}")
    return data, labels


def cifar10(root: str | os.PathLike, split: str = "test") -> TensorDataset:
    """CIFAR-10 from the python folder (``data_batch_1..5``, ``test_batch``): (3, 32, 32) images."""
    root = os.fspath(root)
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10 folder {root!r} does not exist")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [os.path.join(root, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {root!r} lacks {', '.join(map(os.path.basename, missing))}")
    parts = [_read_cifar_batch(p) for p in paths]
    data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([lab for _, lab in parts])
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 labels must be in [0, 9], got values in [{labels.min()}, {labels.max()}]")
    return TensorDataset(torch.from_numpy(data).float().div_(255.0), torch.from_numpy(labels))


class ImageFolder(Dataset):
    """Images under ``root/<class>/``, classes in sorted order, read lazily with Pillow and
    converted to ``channels`` (1: grayscale, 3: RGB), resized to ``size`` (H, W) if given."""

    def __init__(self, root: str | os.PathLike, *, channels: int = 3, size: tuple[int, int] | None = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.classes = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class subfolders (expected root/<class>/<images>)")
        self.samples = [
            (os.path.join(root, c, f), i)
            for i, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(IMAGE_SUFFIXES)
        ]
        if not self.samples:
            raise ValueError(f"image folder {root!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, channels=self.channels, size=self.size), label


def load_image(path: str | os.PathLike, *, channels: int = 3, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as a (channels, H, W) float32 tensor in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a readable image: {exc}") from exc
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def load(spec: str, split: str = "test") -> tuple[TensorDataset | ImageFolder, DataInfo]:
    """A dataset from a command-line specification: ``digits`` / ``digits:SIZE``,
    ``cifar10:PATH`` or ``folder:PATH`` (``folder:PATH`` ignores ``split``)."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        size = int(arg) if arg else 16
        return digits(size, split), DataInfo(DIGITS_CLASSES, (1, size, size))
    if kind == "cifar10" and arg:
        return cifar10(arg, split), DataInfo(CIFAR10_CLASSES, (3, 32, 32))
    if kind == "folder" and arg:
        ds = ImageFolder(arg)
        c, h, w = (int(n) for n in ds[0][0].shape)
        return ds, DataInfo(ds.classes, (c, h, w))
    raise ValueError(f"data must be 'digits', 'digits:SIZE', 'cifar10:PATH' or 'folder:PATH', got {spec!r}")
