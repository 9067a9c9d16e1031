"""Argument checks shared by every public function: each error names the argument, the bad value
and what was expected. They run before any work, so a failed call changes nothing."""

from __future__ import annotations

import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT32_MAX = torch.finfo(torch.float32).max


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def tensor(name: str, value, *, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> torch.Tensor:
    """``value`` must be a tensor of one of ``dtypes`` with at least ``min_dim`` dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(value.shape)}")
    return value


def like(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    """``value`` must have the shape, device (and dtype) of ``ref``."""
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")
    if dtype and value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")


def real(name: str, value, *, low: float | None = None, low_inclusive: bool = True) -> float:
    """``value`` must be a real number (not NaN), >= low (or > low)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    return value


def integer(name: str, value, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def bounds(lower, upper) -> tuple[float, float]:
    lower, upper = real("lower", lower), real("upper", upper)
    if not lower < upper:
        raise ValueError(f"lower must be < upper, got lower={lower}, upper={upper}")
    return lower, upper


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value.lower()


def per_sample(
    name: str,
    value,
    batch: int,
    device: torch.device,
    *,
    positive: bool = False,
    check_values: bool = True,
) -> tuple[float, torch.Tensor | None]:
    """A scalar or per-sample value: returns (float, None) or (0.0, float32 tensor of shape (batch,)).

    The value must be >= 0 (or > 0 if ``positive``) and finite in float32, the type every body
    computes in: inf, and floats beyond float32's largest value (3.4e38, such as 1e39, which
    float32 rounds to inf), are refused. Tensor values are checked when ``check_values``; on a
    CUDA tensor that costs one device sync, which attack loops avoid by checking once per attack.
    """
    if not isinstance(value, torch.Tensor):
        value = real(name, value, low=0.0, low_inclusive=not positive)
        if not value <= FLOAT32_MAX:
            raise ValueError(f"{name} must be finite in float32 (at most {FLOAT32_MAX:.7g}), got {value}")
        return value, None
    if not (value.is_floating_point() and value.dim() == 1 and value.shape[0] == batch):
        raise ValueError(
            f"{name} must be a float or a floating tensor of shape ({batch},) (one value per sample), "
            f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")
    value = value.to(torch.float32).contiguous()
    if check_values and batch:
        bad = torch.isnan(value) | torch.isinf(value) | (value <= 0 if positive else value < 0)
        if bool(bad.any()):  # the one sync
            i = int(bad.nonzero()[0, 0])
            v = float(value[i])
            if math.isinf(v) and v > 0:
                raise ValueError(
                    f"{name} must be finite in float32 (at most {FLOAT32_MAX:.7g}) for every sample, "
                    f"got {v} for sample {i}"
                )
            raise ValueError(f"{name} must be {'>' if positive else '>='} 0 for every sample, got {v} for sample {i}")
    return 0.0, value


def _memory_range(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, past last byte) of a dense tensor's elements, or None if not dense."""
    if t.numel() == 0 or not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return None
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def no_partial_overlap(name: str, written: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """An op that writes ``written`` while reading ``other`` must not see them share some but not
    all of their memory (``pgd_step_(buf[1:], buf[:-1], g)``): the bodies read and write in
    different orders, so the result would depend on the body. The same tensor (identical memory)
    is allowed, as in torch's own in-place ops; non-dense tensors are copied by the ops anyway.

    Under ``torch.compile`` the tensors have no memory to compare (fake tensors) and the compiled
    graph is functionalized (aliased inputs get one synthetic base), so the check is skipped there."""
    if torch.compiler.is_compiling():
        return
    a, b = _memory_range(written), _memory_range(other)
    if a is None or b is None or a == b:
        return
    if a[0] < b[1] and b[0] < a[1]:
        raise ValueError(
            f"{other_name} partly overlaps {name} in memory, which the op writes in place: some of "
            f"their elements are the same memory locations; pass a copy ({other_name}.clone())"
        )
