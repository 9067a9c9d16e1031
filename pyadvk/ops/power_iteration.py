"""Batched power iteration: the largest singular value of many matrices in one call.

For a list of matrices ``W_i`` (each ``m_i × n_i``; any float dtype, arithmetic in float32) and
start vectors ``u_i`` (``m_i``, float32), ``n_iters`` steps of

    v = W_iᵀ u ;  v = v / ||v||   (v = 0 when ||v|| = 0)
    t = W_i v  ;  u = t / ||t||   (u unchanged when ||t|| = 0)

and ``σ_i = uᵀ W_i v = ||W_i v||`` for the final pair. So the op returns ``(sigmas, us, vs)``:
``sigmas`` a float32 tensor of shape (N,), ``us``/``vs`` lists of float32 vectors (m_i,), (n_i,).
Pass the returned ``us`` back next step for a warm start (one iteration per training step then
tracks the top singular pair as the weights move). A zero matrix gives ``σ = 0`` (never NaN), as
does a zero start vector: start from a random (normal) ``u``.

``σ`` is a lower estimate of the spectral norm that converges to it (at the rate of
``(σ_2/σ_1)^2`` per iteration); ``∂σ/∂W = u vᵀ`` at the fixed point, which is how
:mod:`pyadvk.lipschitz` makes ``σ`` differentiable at the model level. The op itself takes the
weights detached: its outputs carry no autograd graph.

Convolution kernels are passed as they are: the public wrapper views every weight with more than
two dims as ``(shape[0], prod(shape[1:]))`` (the reshaped-kernel matrix of
``torch.nn.utils.spectral_norm``; the true operator norm of a convolution is in
:func:`pyadvk.lipschitz.conv_operator_norm`).

The cuda and triton bodies run four phases per iteration on all matrices at once: ``Wᵀu`` (work
split over column blocks of every matrix, with per-block partial sums of squares), normalize
``v``, ``W v`` (row blocks, partial sums), normalize ``u``. The cpp body reads each weight once per
iteration: a column block (at most 512 KiB of W, so it stays in the core's cache) yields its part
of ``Wᵀu`` and then its share of ``W v_raw``, and since ``v`` is ``v_raw`` scaled,
``W v = (Σ shares) / ||v_raw||``. ``power_iteration_reference`` below defines the op; the cpp,
cuda and triton bodies are tested against it.
"""

from __future__ import annotations

import torch

from pyadvk import _backend, _checks
from pyadvk.ops._library import define

define("power_iteration(Tensor[] weights, Tensor[] us, int n_iters) -> (Tensor, Tensor[], Tensor[])")


@torch.library.register_fake("pyadvk::power_iteration")
def _fake(weights, us, n_iters):
    sig = weights[0].new_empty((len(weights),), dtype=torch.float32)
    return (
        sig,
        [w.new_empty((w.shape[0],), dtype=torch.float32) for w in weights],
        [w.new_empty((w.shape[1],), dtype=torch.float32) for w in weights],
    )


POWER_ITERATION = _backend.OpBodies("power_iteration", native_ops=("power_iteration",))


def power_iteration_reference(
    weights: list[torch.Tensor], us: list[torch.Tensor], n_iters: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The torch body: the definition of the op (2-D weights, float32 us)."""
    sigmas, u_out, v_out = [], [], []
    for w, u in zip(weights, us):
        w, u = w.detach().float(), u.detach().float()
        sigma = u.new_zeros(())
        v = w.new_zeros(w.shape[1])
        for _ in range(n_iters):
            v = torch.mv(w.t(), u)
            nv = v.norm()
            v = torch.where(nv > 0, v / torch.where(nv > 0, nv, 1.0), 0.0)
            t = torch.mv(w, v)
            sigma = t.norm()
            u = torch.where(sigma > 0, t / torch.where(sigma > 0, sigma, 1.0), u)
        sigmas.append(sigma)
        u_out.append(u.clone())
        v_out.append(v)
    return torch.stack(sigmas), u_out, v_out


def as_matrix(name: str, w: torch.Tensor) -> torch.Tensor:
    """``w`` viewed as a contiguous 2-D matrix ``(shape[0], prod(shape[1:]))``, detached."""
    _checks.tensor(name, w, min_dim=2)
    return w.detach().reshape(w.shape[0], -1).contiguous()


def check_args(weights, us, n_iters) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Checks the public arguments; returns 2-D contiguous detached weights and float32 us."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors, got {type(weights).__name__}")
    if isinstance(us, torch.Tensor) or not isinstance(us, (list, tuple)):
        raise TypeError(f"us must be a list of tensors, got {type(us).__name__}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one matrix, got an empty list")
    if len(us) != len(weights):
        raise ValueError(f"us must hold one vector per weight ({len(weights)}), got {len(us)}")
    n_iters = _checks.integer("n_iters", n_iters, low=1)
    mats = [as_matrix(f"weights[{i}]", w) for i, w in enumerate(weights)]
    dtype, device = mats[0].dtype, mats[0].device
    vecs = []
    for i, (w, u) in enumerate(zip(mats, us)):
        if w.dtype != dtype:
            raise TypeError(f"weights[{i}] must have the dtype of weights[0] ({dtype}), got {w.dtype}")
        if w.device != device:
            raise ValueError(f"weights[{i}] must be on {device} like weights[0], got {w.device}")
        _checks.tensor(f"us[{i}]", u)
        if tuple(u.shape) != (w.shape[0],):
            raise ValueError(
                f"us[{i}] must have shape ({w.shape[0]},) (rows of weights[{i}], shape "
                f"{tuple(weights[i].shape)}), got {tuple(u.shape)}"
            )
        if u.device != device:
            raise ValueError(f"us[{i}] must be on {device}, got {u.device}")
        vecs.append(u.detach().to(torch.float32).contiguous())
    return mats, vecs, n_iters


def run(mats, vecs, n_iters, backend=None):
    """Runs checked arguments (see :func:`check_args`) on the chosen body."""
    name = _backend.resolve(POWER_ITERATION, mats[0].device, backend)
    if name == "torch":
        return power_iteration_reference(mats, vecs, n_iters)
    if name == "triton":
        return torch.ops.pyadvk.power_iteration_triton(mats, vecs, n_iters)
    return torch.ops.pyadvk.power_iteration(mats, vecs, n_iters)


def power_iteration(
    weights: list[torch.Tensor],
    us: list[torch.Tensor],
    n_iters: int = 1,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``n_iters`` power-iteration steps on every matrix at once (see the module docstring).

    Args:
        weights: non-empty list of tensors with >= 2 dims, one dtype (float32/float16/bfloat16)
            and device; a tensor with more dims is viewed as ``(shape[0], -1)``. Read detached.
        us: one start vector per weight, shape ``(shape[0],)``; converted to float32.
        n_iters: iterations (>= 1).
        backend: force a body ("cuda", "triton", "cpp", "torch"); default: see pyadvk.set_backend.

    Returns:
        ``(sigmas, us, vs)``: float32 σ of shape (N,), and the final singular-vector estimates.
    """
    mats, vecs, n_iters = check_args(weights, us, n_iters)
    return run(mats, vecs, n_iters, backend)
