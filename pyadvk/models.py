"""Named architectures, and safe loading of model files.

Architectures (``build(name, **kwargs)``): ``small_cnn`` (the demo's network), ``resnet18`` (the
CIFAR variant: 3×3 stem, no max-pool) and ``resnet50`` (the ImageNet one). Each takes
``activation="relu"`` or ``"half_huber"`` (the half-Huber ReLU of Woods et al.).

Model files (:func:`load_model`) are read safely by default:

* a pyadvk model file (:func:`save_model`: architecture name, its arguments and the weights) or a
  plain state dict with ``arch=`` named: loaded with ``torch.load(weights_only=True)``, which
  unpickles tensors and containers only.

Files that carry code are refused unless ``trust_code=True`` (``--trust-code``; the older name
``trust_pickle`` / ``--trust-pickle`` still works): a pickled ``nn.Module`` (unpickling runs
arbitrary code) and a TorchScript archive (``torch.jit.save``: its ``__setstate__`` and ``forward``
are code from the file, which can for example create or overwrite files through ``torch.from_file``).

Before anything is read, a file's zip archive is checked (every entry's CRC-32): a damaged file
raises :class:`pyadvk._io.CorruptFileError` instead of loading with changed weights.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pyadvk.lipschitz.model import LipschitzParts

FORMAT = "pyadvk-model/1"


def activation_layer(activation: str) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "half_huber":
        from pyadvk.nn import HalfHuberReLU

        return HalfHuberReLU()
    raise ValueError(f"activation must be 'relu' or 'half_huber', got {activation!r}")


class SmallCNN(nn.Module):
    """conv(32)-act-conv(32)-act-pool, conv(64)-act-conv(64)-act-pool, linear(128)-act-linear.

    With ``activation="half_huber"`` the weights are initialized He-normal (zero biases): the
    half-Huber ReLU squashes small inputs quadratically (x²/2δ below δ = 0.5), so under torch's
    default (smaller) initialization the signal fades through this BatchNorm-free stack and the
    network barely trains (measured on the digits: cross-entropy still 1.96 after 3 epochs,
    against 0.08 with He init).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 16,
        width: int = 32,
        activation: str = "relu",
    ):
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input_size must be a multiple of 4, got {input_size}")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            activation_layer(activation),
            nn.Conv2d(w, w, 3, padding=1),
            activation_layer(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            activation_layer(activation),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            activation_layer(activation),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * (input_size // 4) ** 2, 4 * w),
            activation_layer(activation),
            nn.Linear(4 * w, num_classes),
        )
        if activation == "half_huber":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def lipschitz_parts(self) -> LipschitzParts:
        """The forward for :func:`pyadvk.lipschitz.lipschitz_bound`: features, then classifier."""
        return LipschitzParts(branch=("features", "classifier"))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = activation_layer(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = activation_layer(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))

    def lipschitz_parts(self) -> LipschitzParts:
        """The forward for :func:`pyadvk.lipschitz.lipschitz_bound`: ``act2(branch(x) + shortcut(x))``."""
        return LipschitzParts(branch=("conv1", "bn1", "act1", "conv2", "bn2"), shortcut="shortcut", activation="act2")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, activation: str):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = activation_layer(activation)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = activation_layer(activation)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act3 = activation_layer(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + self.shortcut(x))

    def lipschitz_parts(self) -> LipschitzParts:
        """The forward for :func:`pyadvk.lipschitz.lipschitz_bound`: ``act3(branch(x) + shortcut(x))``."""
        return LipschitzParts(
            branch=("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3"),
            shortcut="shortcut",
            activation="act3",
        )


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int, in_channels: int, stem: str, activation: str):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), activation_layer(activation)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                activation_layer(activation),
                nn.MaxPool2d(3, 2, 1),
            )
        cin, stages = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, activation))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def lipschitz_parts(self) -> LipschitzParts:
        """The forward for :func:`pyadvk.lipschitz.lipschitz_bound`: stem, the four stages, pool and
        fc in order (the flatten between pool and fc moves no value: Lipschitz constant 1)."""
        return LipschitzParts(branch=("stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"))


def resnet18(num_classes: int = 10, in_channels: int = 3, activation: str = "relu") -> ResNet:
    """ResNet-18 for 32×32 inputs (CIFAR variant: 3×3 stem, no max-pool)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, "cifar", activation)


def resnet50(num_classes: int = 1000, in_channels: int = 3, activation: str = "relu") -> ResNet:
    """ResNet-50 for 224×224 inputs (ImageNet stem)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, "imagenet", activation)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "resnet18": resnet18, "resnet50": resnet50}


def build(name: str, **kwargs) -> nn.Module:
    if name not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name](**kwargs)


#: Square image sizes :func:`fitting_input_shapes` tries (the common datasets' and models' sizes).
PROBE_SIZES = (8, 16, 28, 32, 64, 96, 128, 224, 256, 299)


def first_layer_channels(model: nn.Module) -> int | None:
    """The input channels of ``model``'s first convolution (None if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


@torch.no_grad()
def fitting_input_shapes(
    model: nn.Module,
    channels: Sequence[int] = (1, 3),
    sizes: Sequence[int] = PROBE_SIZES,
    device: torch.device | str | None = None,
) -> list[tuple[int, int, int]]:
    """The ``(C, H, W)`` image shapes (``C`` in ``channels``, square ``H = W`` in ``sizes``) on which
    ``model`` runs and returns one row of logits per image: found by trying a batch of one zero
    image of each shape (the model's mode is left as it was: eval for the trial). For telling a
    user which input size a model expects when theirs does not fit."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else "cpu"
    was_training = model.training
    model.eval()
    fits = []
    try:
        for c in channels:
            for size in sizes:
                try:
                    out = model(torch.zeros(1, c, size, size, device=device))
                except (RuntimeError, ValueError, IndexError):
                    continue
                if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
                    fits.append((int(c), int(size), int(size)))
    finally:
        model.train(was_training)
    return fits


def save_model(model: nn.Module, path: str | os.PathLike, arch: str, **arch_kwargs) -> None:
    """Writes a pyadvk model file (atomically): architecture name, its arguments, the weights.
    It loads with ``torch.load(weights_only=True)``: no code is unpickled."""
    from pyadvk._io import save_torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch({"format": FORMAT, "arch": arch, "arch_kwargs": arch_kwargs, "state_dict": state}, path)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())


def _is_legacy_torch_file(path: str) -> bool:
    """Whether ``path`` starts as torch's pre-1.6 (non-zip) format does: the pickled magic number."""
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    **arch_kwargs: Any,
) -> nn.Module:
    """Loads a model file safely (see the module docstring); the model is returned in eval mode.

    ``trust_code=True`` (or its older name ``trust_pickle=True``) allows files that carry code:
    pickled modules and TorchScript archives. Only for files whose source you trust."""
    from pyadvk._io import check_archive

    path = os.fspath(path)
    trust_code = bool(trust_code or trust_pickle)
    if os.path.isdir(path):
        raise FileNotFoundError(f"model file {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    check_archive(path, "model file")
    if _is_torchscript(path):
        if not trust_code:
            raise ValueError(
                f"{path!r} is a TorchScript archive: it carries code that runs when it is loaded and "
                "called. Pass --trust-code (trust_code=True) only if you trust its source; otherwise "
                "save the weights with pyadvk train or torch.save(model.state_dict())."
            )
        try:
            return torch.jit.load(path, map_location=map_location).eval()
        except RuntimeError as exc:
            raise ValueError(f"{path!r} looks like a TorchScript archive but does not load: {exc}") from exc
    if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
        raise ValueError(
            f"{path!r} is not a model file torch can read: neither the zip archive torch.save writes "
            "nor torch's legacy format (a damaged, truncated or unrelated file)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():  # not pickled code: not a torch file
            raise ValueError(f"{path!r} is not a model file torch can read ({exc})") from exc
        if not trust_code:
            raise ValueError(
                f"{path!r} is not a TorchScript archive, a pyadvk model file or a state dict: it holds "
                "pickled code (for example a whole nn.Module). Loading it runs code from the file; "
                "pass --trust-code (trust_code=True; formerly --trust-pickle) only if you trust its source."
            ) from exc
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        # not a zip archive and not torch's legacy format either (a text file, random bytes, ...)
        raise ValueError(f"{path!r} is not a model file torch can read ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        arch = arch or obj.get("arch")
        if not isinstance(arch, str):
            raise ValueError(
                f"{path!r} is a pyadvk model file without an architecture name: name it with --arch "
                f"({', '.join(ARCHITECTURES)})"
            )
        arch_kwargs = {**obj.get("arch_kwargs", {}), **arch_kwargs}
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a model, a pyadvk model file or a state dict")
    if arch is None:
        raise ValueError(
            f"{path!r} holds a bare state dict: name its architecture with --arch ({', '.join(ARCHITECTURES)})"
        )
    model = build(arch, **arch_kwargs)
    try:
        model.load_state_dict(obj)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {path!r} do not fit arch {arch!r} {arch_kwargs}: {exc}") from exc
    return model.to(map_location).eval()
