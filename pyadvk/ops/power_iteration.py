"""Batched power iteration: the largest singular value of many matrices in one call.

For a list of matrices ``W_i`` (each ``m_i × n_i``; any float dtype, arithmetic in float32) and
start vectors ``u_i`` (``m_i``, float32), ``n_iters`` steps of

    v = W_iᵀ u ;  v = v / ||v||   (v = 0 when ||v|| = 0)
    t = W_i v  ;  u = t / ||t||   (u unchanged when ||t|| = 0)

and ``σ_i = uᵀ W_i v = ||W_i v||`` for the final pair. So the op returns ``(sigmas, us, vs)``:
``sigmas`` a float32 tensor of shape (N,), ``us``/``vs`` lists of float32 vectors (m_i,), (n_i,).
Pass the returned ``us`` back next step for a warm start (one iteration per training step then
tracks the top singular pair as the weights move), or ``us=None`` for a cold start from random
unit vectors (reproducible with ``generator=``). A zero matrix gives ``σ = 0`` (never NaN), as does
a zero start vector.

Extreme values: the norms are float64 sums of squares and the normalizations divide in float64,
so entries from 1e-30 to 1e30 give σ to float32 accuracy (σ of ``c·W`` is ``c·σ(W)``, exactly for
a power of two ``c``). A σ beyond float32's range is ``inf`` (NaN when already ``Wᵀu`` overflows).
A NaN or inf in ``W_i`` or ``u_i`` gives ``σ_i = NaN``, ``v_i`` NaN and ``u_i`` unchanged: never a
finite "norm". Every body follows these rules (the torch body below defines them).

``σ`` is a lower estimate of the spectral norm that converges to it (the relative error of ``σ²``
after k iterations is at most ``tan²θ₀ (σ₂/σ₁)^(4k-2)``, θ₀ the angle between the start and the top
left singular vector); ``∂σ/∂W = u vᵀ`` at the fixed point, which is how :mod:`pyadvk.lipschitz`
makes ``σ`` differentiable at the model level. The op itself takes the weights detached: its
outputs carry no autograd graph.

Convolution kernels are passed as they are: the public wrapper views every weight with more than
two dims as ``(shape[0], prod(shape[1:]))`` (the reshaped-kernel matrix of
``torch.nn.utils.spectral_norm``; the true operator norm of a convolution is in
:func:`pyadvk.lipschitz.conv_operator_norm`).

The compiled op ``pyadvk::power_iteration_packed`` takes the start vectors packed into one
vector (``u`` of length Σ m_i) and returns σ, u and v packed; the wrapper splits them into views
(no copy). The cuda and triton bodies split every iteration over all matrices at once: tiles of
``Wᵀu`` (column blocks × row chunks, summed in a second pass), normalize ``v``, ``W v`` (row
blocks), normalize ``u``. Their task tables depend only on the weights' data pointers and shapes,
so they are built once per set of weights and kept on the device (a small cache in each body): a
call with the same weights (a training step) makes no host synchronization and can be captured in
a CUDA graph. The cpp body reads each weight once per iteration: a column block (at most 512 KiB
of W, so it stays in the core's cache) yields its part of ``Wᵀu`` and then its share of ``W v``.
``power_iteration_reference`` below defines the op; the cpp, cuda and triton bodies are tested
against it.

Files: csrc/power_iteration.h (tables, checks), csrc/power_iteration.cpp and
csrc/cpu/power_iteration_kernels.inc (cpp), csrc/cuda/power_iteration.cu (cuda),
kernels/power_iteration.py (triton), tests/test_power_iteration.py, tests/test_power_iteration_gpu.py,
benchmarks/bench_power_iteration.py.
"""

from __future__ import annotations

import math

import torch

from pyadvk import _backend, _checks
from pyadvk.ops._library import define

define("power_iteration_packed(Tensor[] weights, Tensor u, int n_iters) -> (Tensor, Tensor, Tensor)")


@torch.library.register_fake("pyadvk::power_iteration_packed")
def _fake(weights, u, n_iters):
    total_n = sum(w.shape[1] for w in weights)
    return (
        weights[0].new_empty((len(weights),), dtype=torch.float32),
        u.new_empty(u.shape),
        u.new_empty((total_n,)),
    )


POWER_ITERATION = _backend.OpBodies("power_iteration", native_ops=("power_iteration_packed",))


def power_iteration_reference(
    weights: list[torch.Tensor], u: torch.Tensor, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch body: the definition of the op (2-D weights, packed float32 u; returns σ, u, v
    packed). Norms are float64; divisions are float64 rounded to float32."""
    sigmas, u_out, v_out = [], [], []
    for w, u0 in zip(weights, u.split([w.shape[0] for w in weights])):
        w, u0 = w.detach().float(), u0.detach().float()
        # A NaN or inf anywhere in W or u gives σ = NaN whatever torch.mv does with it (BLAS may
        # skip the columns of zero entries of u, dropping a NaN times zero). Wᵀ(2⁻⁶⁴·1) touches
        # every entry and cannot overflow for finite W (|entries| · 2⁻⁶⁴ < 2⁶⁵), so its sum is
        # finite exactly when W is; one matvec, where isfinite(W).all() costs several passes.
        probe = torch.mv(w.t(), u0.new_full((w.shape[0],), 2.0**-64)).sum(dtype=torch.float64)
        finite = torch.isfinite(probe + u0.sum(dtype=torch.float64))
        vec = u0
        sigma = u0.new_zeros(())
        v = w.new_zeros(w.shape[1])
        for _ in range(n_iters):
            v_raw = torch.mv(w.t(), vec)
            nv = torch.linalg.vector_norm(v_raw, dtype=torch.float64)
            ok = (nv > 0) & torch.isfinite(nv)
            v = (v_raw.double() / torch.where(ok, nv, 1.0)).float()
            v = torch.where(ok, v, torch.where(nv == 0, 0.0, math.nan))
            t = torch.mv(w, v)
            nt = torch.linalg.vector_norm(t, dtype=torch.float64)
            sigma = torch.where(torch.isfinite(nv), nt, math.nan).float()
            good = (nt > 0) & torch.isfinite(nt)
            vec = torch.where(good, (t.double() / torch.where(good, nt, 1.0)).float(), vec)
        sigmas.append(torch.where(finite, sigma, math.nan))
        u_out.append(torch.where(finite, vec, u0))
        v_out.append(torch.where(finite, v, math.nan))
    return torch.stack(sigmas), torch.cat(u_out), torch.cat(v_out)


def as_matrix(name: str, w: torch.Tensor) -> torch.Tensor:
    """``w`` viewed as a contiguous 2-D matrix ``(shape[0], prod(shape[1:]))``, detached."""
    _checks.tensor(name, w, min_dim=2)
    return w.detach().reshape(w.shape[0], math.prod(w.shape[1:])).contiguous()  # (-1 fails for 0 rows)


def random_unit_vectors(
    sizes: list[int], device: torch.device, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """One random unit vector (float32, normal direction) per size, on ``device``: the cold start
    of a power iteration. Drawn on the generator's device (CPU without one, from the global RNG)
    and then moved, so one seed gives the same vectors on every device."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    source = generator.device if generator is not None else torch.device("cpu")
    out = []
    for m in sizes:
        x = torch.randn(m, generator=generator, device=source, dtype=torch.float64)
        norm = x.norm()
        x = x / torch.where(norm > 0, norm, 1.0)
        out.append(x.float().to(device))
    return out


def check_args(weights, us, n_iters, generator=None) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Checks the public arguments; returns 2-D contiguous detached weights and float32 us
    (random unit vectors from ``generator`` when ``us`` is None)."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors, got {type(weights).__name__}")
    if us is not None and (isinstance(us, torch.Tensor) or not isinstance(us, (list, tuple))):
        raise TypeError(f"us must be a list of tensors or None (a cold start), got {type(us).__name__}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one matrix, got an empty list")
    if us is not None and len(us) != len(weights):
        raise ValueError(f"us must hold one vector per weight ({len(weights)}), got {len(us)}")
    n_iters = _checks.integer("n_iters", n_iters, low=1)
    mats = [as_matrix(f"weights[{i}]", w) for i, w in enumerate(weights)]
    dtype, device = mats[0].dtype, mats[0].device
    for i, w in enumerate(mats):
        if w.dtype != dtype:
            raise TypeError(f"weights[{i}] must have the dtype of weights[0] ({dtype}), got {w.dtype}")
        if w.device != device:
            raise ValueError(f"weights[{i}] must be on {device} like weights[0], got {w.device}")
    if us is None:
        return mats, random_unit_vectors([w.shape[0] for w in mats], device, generator), n_iters
    if generator is not None:
        raise ValueError("generator seeds a cold start: pass it with us=None, not with start vectors")
    vecs = []
    for i, (w, u) in enumerate(zip(mats, us)):
        _checks.tensor(f"us[{i}]", u)
        if tuple(u.shape) != (w.shape[0],):
            raise ValueError(
                f"us[{i}] must have shape ({w.shape[0]},) (rows of weights[{i}], shape "
                f"{tuple(weights[i].shape)}), got {tuple(u.shape)}"
            )
        if u.device != device:
            raise ValueError(f"us[{i}] must be on {device}, got {u.device}")
        vecs.append(u.detach().to(torch.float32))
    return mats, vecs, n_iters


def run_packed(
    mats: list[torch.Tensor], u: torch.Tensor, n_iters: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs checked arguments with packed start vectors on the chosen body: (σ, u, v) packed."""
    name = _backend.resolve(POWER_ITERATION, mats[0].device, backend)
    if name == "torch":
        return power_iteration_reference(mats, u, n_iters)
    if name == "triton":
        return torch.ops.pyadvk.power_iteration_packed_triton(mats, u, n_iters)
    return torch.ops.pyadvk.power_iteration_packed(mats, u, n_iters)


def run(mats, vecs, n_iters, backend=None):
    """Runs checked arguments (see :func:`check_args`): ``(sigmas, us, vs)`` with per-matrix
    views of the packed results."""
    u = torch.cat(vecs) if len(vecs) > 1 else vecs[0].contiguous()
    sigma, u, v = run_packed(mats, u, n_iters, backend)
    return sigma, list(u.split([w.shape[0] for w in mats])), list(v.split([w.shape[1] for w in mats]))


def power_iteration(
    weights: list[torch.Tensor],
    us: list[torch.Tensor] | None = None,
    n_iters: int = 1,
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``n_iters`` power-iteration steps on every matrix at once (see the module docstring).

    Args:
        weights: non-empty list of tensors with >= 2 dims, one dtype (float32/float16/bfloat16)
            and device; a tensor with more dims is viewed as ``(shape[0], -1)``. Read detached.
        us: one start vector per weight, shape ``(shape[0],)``, converted to float32 (the ``us``
            of the previous call: a warm start); None: a cold start from random unit vectors.
        n_iters: iterations (>= 1).
        generator: the random source of a cold start (``us=None``): the same seed gives the same
            vectors on every device and body. Default: torch's global RNG.
        backend: force a body ("cuda", "triton", "cpp", "torch"); default: see pyadvk.set_backend.

    Returns:
        ``(sigmas, us, vs)``: float32 σ of shape (N,), and the final singular-vector estimates
        (views of one packed vector each).
    """
    mats, vecs, n_iters = check_args(weights, us, n_iters, generator)
    return run(mats, vecs, n_iters, backend)
