"""Arguments and checks shared by the commands that take a model and data."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pyadvk import data as data_mod
from pyadvk import distributed, models
from pyadvk.nn import IMAGENET_MEAN, IMAGENET_STD, Normalize, with_normalization


class UserError(Exception):
    """An error in what the user asked for: printed without a traceback, exit code 2."""


def parse_budget(name: str, text: str) -> float:
    """A positive finite number written as a float (``0.031``) or a fraction (``8/255``)."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{name} must be a number or a fraction like 8/255, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be > 0 and finite, got {text!r}")
    return value


def _nearest_existing(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing ancestor (``/`` at worst)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _probe_writable(folder: str) -> str | None:
    """None if a file can be created in ``folder`` (tried for real, then removed: permission bits
    say nothing for root or on a read-only mount), else the reason it cannot."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyadvk-write-check-", suffix=".tmp")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def _folder_problem(folder: str) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None if they can."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    reason = _probe_writable(existing)
    if reason is None:
        return None
    if existing == os.path.abspath(folder):
        return f"the folder {existing!r} is not writable ({reason})"
    return f"cannot create it: {existing!r} is not writable ({reason})"


def check_output_dir(flag: str, path: str | os.PathLike | None, files: Sequence[str] = ()) -> None:
    """Raises :class:`UserError` (one line, exit 2) unless the command can write into folder ``path``:
    it is a writable folder, or does not exist yet below a writable folder (nothing is created
    here), and none of ``files`` (names inside it the command will write) is a folder. Commands call
    it before any work, so a run never fails at the end for want of a place to put its results.
    ``path=None`` (an optional output not asked for) passes."""
    if path is None:
        return
    path = os.fspath(path)
    problem = _folder_problem(path)
    if problem is not None:
        raise UserError(f"{flag} {path!r}: {problem}")
    for name in files:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            raise UserError(f"{flag} {path!r}: {target!r} is a folder, where the command writes a file")


def check_output_file(flag: str, path: str | os.PathLike) -> None:
    """Raises :class:`UserError` unless the command can write the file ``path``: not a folder, in a
    folder that is writable or can be created (see :func:`check_output_dir`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; give a file name (e.g. {os.path.join(path, 'out.png')!r})")
    problem = _folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem is not None:
        raise UserError(f"{flag} {path!r}: {problem}")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a clear usage error otherwise, not a traceback later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device (cpu, cuda or cuda:N; default cuda when one is visible)."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")


def say(*parts: object) -> None:
    """print(), on rank 0 only (every process prints without a process group)."""
    if distributed.is_main():
        print(*parts)


def device_from(args: argparse.Namespace) -> torch.device:
    """The device of --device (the rank's own under torchrun); a UserError for an absent CUDA."""
    if distributed.is_distributed():
        return distributed.local_device()
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is visible")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_model_args(p: argparse.ArgumentParser, *, random_weights: bool = False) -> None:
    """--model/--arch/--num-classes/--in-channels/--trust-code. With ``random_weights`` the
    model file is optional: --arch alone builds that architecture with random weights."""
    p.add_argument(
        "--model",
        required=not random_weights,
        default=None,
        metavar="FILE",
        help="TorchScript archive, pyadvk model file (pyadvk train), or state dict with --arch",
    )
    p.add_argument(
        "--arch",
        default=None,
        choices=sorted(models.ARCHITECTURES),
        help="architecture of a bare state dict"
        + (", or alone: that architecture with random weights" if random_weights else ""),
    )
    p.add_argument("--num-classes", type=int, default=None, help="classes of --arch (default: the data's)")
    p.add_argument("--in-channels", type=int, default=None, help="input channels of --arch (default: the data's)")
    p.add_argument(
        "--trust-code",
        "--trust-pickle",
        dest="trust_code",
        action="store_true",
        help="allow model files that carry code: pickled modules and TorchScript archives (runs code "
        "from the file: only if you trust it; --trust-pickle is the older name)",
    )
    p.add_argument(
        "--normalize",
        nargs="+",
        default=None,
        metavar="MEAN STD",
        help="the model expects (x - MEAN) / STD of a [0, 1] image: pyadvk.nn.Normalize is put in front "
        "of it, so budgets, distances and explanations stay in pixel space. MEAN and STD: one number or "
        "comma-separated per-channel values (e.g. --normalize 0.4914,0.4822,0.4465 0.2470,0.2435,0.2616), "
        "or the one word imagenet",
    )


def arch_kwargs(
    arch: str, info: data_mod.DataInfo | None, num_classes: int | None = None, in_channels: int | None = None
) -> dict[str, Any]:
    """The constructor arguments of ``arch`` for the data described by ``info`` (explicit
    ``num_classes``/``in_channels`` win; without ``info``: 10 classes, 3 channels)."""
    kwargs = {
        "num_classes": num_classes or (info.num_classes if info else 10),
        "in_channels": in_channels or (info.image_shape[0] if info else 3),
    }
    if arch == "small_cnn" and info:
        kwargs["input_size"] = info.image_shape[-1]
    return kwargs


def parse_normalize(values: Sequence[str] | None) -> Normalize | None:
    """--normalize's values as a :class:`pyadvk.nn.Normalize`: ``MEAN STD`` (each one number or
    comma-separated per-channel values) or ``imagenet``; None without the flag."""
    if values is None:
        return None
    if len(values) == 1 and values[0].strip().lower() == "imagenet":
        return Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if len(values) != 2:
        raise UserError(f"--normalize takes MEAN STD (or imagenet), got {' '.join(values)!r}")
    parsed = []
    for name, text in zip(("MEAN", "STD"), values):
        try:
            parsed.append([float(v) for v in text.split(",")])
        except ValueError:
            raise UserError(f"--normalize {name} must be numbers separated by commas, got {text!r}") from None
    try:
        return Normalize(*parsed)
    except ValueError as exc:
        raise UserError(f"--normalize {' '.join(values)}: {exc}") from None


def normalized(model: nn.Module, normalize: Normalize | None) -> nn.Module:
    """``model`` fed ``normalize(x)`` instead of ``x``. A module gets a forward pre-hook (the
    model and its layer names stay as in its file, for ``--layers``); anything else (a TorchScript
    module) is wrapped as ``nn.Sequential(normalize, model)``."""
    if normalize is None:
        return model
    ref = next(iter(model.parameters()), None)
    normalize = normalize.to(ref.device) if ref is not None else normalize
    if isinstance(model, torch.jit.ScriptModule) or not isinstance(model, nn.Module):
        return with_normalization(model, normalize)
    model.register_forward_pre_hook(lambda _module, inputs: (normalize(inputs[0]), *inputs[1:]))
    return model


def load_model(args: argparse.Namespace, device: torch.device, info: data_mod.DataInfo | None = None) -> nn.Module:
    """The model of --model/--arch (see :func:`pyadvk.models.load_model`), with --normalize in
    front of it, on ``device``, in eval mode."""
    normalize = parse_normalize(getattr(args, "normalize", None))  # checked before the file is read
    kwargs = arch_kwargs(args.arch, info, args.num_classes, args.in_channels) if args.arch else {}
    model = models.load_model(args.model, arch=args.arch, trust_code=args.trust_code, map_location=device, **kwargs)
    return normalized(model, normalize)


def add_data_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--data (required unless ``default``), --split and --batch-size."""
    p.add_argument(
        "--data",
        default=default,
        required=default is None,
        metavar="SPEC",
        help="digits, digits:SIZE, cifar10:PATH or folder:PATH" + (f" (default {default})" if default else ""),
    )
    p.add_argument("--split", default="test", choices=("train", "test"), help="which split (default test)")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch (default 250)")


def note_fewer_images(flag: str, n: int, available: int, args: argparse.Namespace, split: str) -> None:
    """Says (rank 0) when ``flag n`` asks for more images than the split has, so the count the
    command reports is not a surprise (``ara --num-images 1000`` on the digits' 359 test images)."""
    if n > available:
        say(f"note: {flag} {n} asks for more images than the {split} split of {args.data} has; using all {available}")


def load_data(
    args: argparse.Namespace,
    *,
    split: str | None = None,
    shuffle: bool = False,
    n: int | None = None,
    n_flag: str = "--num-images",
) -> tuple[DataLoader, data_mod.DataInfo]:
    """The loader of --data (this rank's shard of its first ``n`` images under torchrun; a note
    when ``n``, given as ``n_flag``, exceeds the split) and what the data holds."""
    split = split or args.split
    dataset, info = data_mod.load(args.data, split)
    if len(dataset) == 0:
        raise UserError(f"--data {args.data}: no images")
    if n is not None:
        note_fewer_images(n_flag, n, len(dataset), args, split)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if distributed.is_distributed():
        return distributed.shard_loader(
            dataset, args.batch_size, n=n, shuffle=shuffle, seed=getattr(args, "seed", 0)
        ), info
    first_n = dataset if n is None else torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    return DataLoader(first_n, batch_size=args.batch_size, shuffle=shuffle), info


def check_model_on(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """Checks the first batch is in [0, 1] and the model maps it to (B, C) logits; returns C."""
    images, labels = next(iter(loader))
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    with torch.no_grad():
        logits = model(images[:2].to(device))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != min(2, len(images)):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model must return (B, C) logits, got {shape} for a batch of {min(2, len(images))}")
    if int(labels.max()) >= logits.shape[1]:
        raise UserError(f"the data has label {int(labels.max())} but the model has {logits.shape[1]} classes")
    return logits.shape[1]
