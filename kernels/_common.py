"""Pieces shared by the Triton bodies of the per-sample and elementwise ops (kernels/pgd.py,
apgd.py, half_huber.py): tiles inside one sample, NaN-propagating min/max, the device context of a
launch, and the autotuning of the memory-bound elementwise kernels.

* Triton launches on the *current* CUDA device, not on the tensors' device: every launch runs
  inside :func:`on_device_of` (``torch.cuda.device(t.device)`` for CUDA tensors).
* ``tl.minimum`` / ``tl.maximum`` drop a NaN operand on a GPU (by default) where torch.minimum /
  maximum / clamp propagate it; :func:`min_nan`, :func:`max_nan` and :func:`clamp_nan` propagate
  it on every device (the interpreter's numpy minimum would hide the difference).
* The elementwise kernels are autotuned over :data:`ELEMENTWISE_CONFIGS` (BLOCK, num_warps),
  keyed on :func:`size_class` (the power of two above numel), so a configuration is chosen once
  per size class and kept; in-place launches restore their output between timed runs.
  :func:`benchmark` times the candidates with ``triton.testing.do_bench`` on a GPU and with the
  wall clock under the interpreter (which has no GPU driver to time with).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

# (BLOCK, num_warps) candidates for memory-bound elementwise kernels: 4-16 values per thread.
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]

# Values per program of the l2 (reduce, then apply) kernels: both passes must tile alike, so their
# tile is planned from the sample size (plan()) rather than autotuned per kernel.
PARTIAL_BLOCK = 128


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context every launch on ``t`` runs in: ``t``'s CUDA device made current (Triton launches
    on the current device); nothing to switch for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def unfused(t: torch.Tensor) -> dict:
    """The launch option that keeps every float32 multiply and add separately rounded, as the torch
    body's separate ops are: on a GPU Triton fuses ``a * b + c`` into one FMA by default, which moves
    a result by an ulp, and by far more where a step much larger than its result cancels (the cpp
    and CUDA bodies are built without contraction too, setup.py). Given for launches on real
    tensors only: left out while torch.compile traces, and for fake tensors (opcheck, export),
    where the launch is analysed rather than run and the option is not a kernel argument (a
    compiled graph may fuse)."""
    if torch.compiler.is_compiling() or is_fake(t):
        return {}
    return {"enable_fp_fusion": False}


def size_class(n: int) -> int:
    """The autotuning key of a launch over ``n`` values: the exponent of the power of two >= n."""
    return max(n - 1, 0).bit_length()


def benchmark(kernel_call, quantiles):
    """Autotuning timer: ``triton.testing.do_bench`` on a GPU; under ``TRITON_INTERPRET=1`` one
    timed run after a warm-up (the interpreter has no driver to time with)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        kernel_call()
        start = time.perf_counter()
        kernel_call()
        elapsed = (time.perf_counter() - start) * 1e3
        return [elapsed] * len(quantiles)
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def plan(x: torch.Tensor) -> tuple[int, int, int]:
    """(D, per_sample, BLOCK) of a per-sample launch over the (B, D) view of ``x``: values per
    sample, tiles per sample, tile size (a power of two in [128, 4096])."""
    D = x.numel() // x.shape[0]
    block = max(128, min(4096, triton.next_power_of_2(D)))
    return D, triton.cdiv(D, block), block


@triton.jit
def tile(D, BLOCK: tl.constexpr):
    """This program's tile of a per-sample launch (grid B * cdiv(D, BLOCK)): sample b, the int64
    offsets of its values and their mask."""
    per_sample = tl.cdiv(D, BLOCK)
    t = tl.program_id(0).to(tl.int64)
    b = t // per_sample
    idx = (t - b * per_sample) * BLOCK + tl.arange(0, BLOCK)
    return b, b * D + idx, idx < D


@triton.jit
def per_sample_value(ptr, b, scalar, HAS_TENSOR: tl.constexpr, DTYPE: tl.constexpr):
    """Sample b's value of a per-sample parameter: ``ptr[b]`` or the scalar, as DTYPE."""
    if HAS_TENSOR:
        value = tl.load(ptr + b).to(DTYPE)
    else:
        value = tl.cast(scalar, DTYPE)
    return value


@triton.jit
def load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def max_nan(a, b):
    """torch.maximum: NaN if either operand is NaN."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def min_nan(a, b):
    """torch.minimum: NaN if either operand is NaN."""
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def clamp_nan(v, lo, hi):
    """torch.clamp(v, lo, hi): NaN stays NaN."""
    return min_nan(max_nan(v, lo), hi)


@triton.jit
def sample_sum(partial_ptr, b, per_sample, PARTIAL_BLOCK: tl.constexpr):
    """Sample b's total of its per-tile partials (one float64 per tile), added in one fixed order."""
    acc = tl.zeros([PARTIAL_BLOCK], tl.float64)
    for start in range(0, per_sample, PARTIAL_BLOCK):
        c = start + tl.arange(0, PARTIAL_BLOCK)
        acc += tl.load(partial_ptr + b * per_sample + c, mask=c < per_sample, other=0.0)
    return tl.sum(acc, axis=0)
