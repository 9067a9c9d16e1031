"""The robust-training additions of Woods et al. (2019), "Adversarial explanations for understanding
image classification decisions and improved neural network robustness": a Lipschitz-inspired
input-gradient penalty and its adaptive weight.

Training loss per batch (the paper's, and its public reference code's)::

    loss = CE(model(x), y) + psi * input_gradient_penalty(model, x, y)

with ``psi`` from :class:`AdaptivePsi`, updated with the batch's cross-entropy before the penalty
is weighted (the order of the reference code).

Sources: the paper's full text is not available here; the formulas below were checked against
the project's research notes (RESEARCH.md) and the authors' public reference code
(github.com/wwoods/adversarial-explanations-cifar, ``main.py``: ``_model_robust_get_grads`` and
``_model_train_batch``), whose defaults are zeta = 0.2, p = 2, psi0 = 220, k = 0.02,
L_target = 1.5, eps_pos = 1, eps_neg = 0.01. The Half-Huber ReLU
(:class:`pyadvk.nn.HalfHuberReLU`) is the activation that makes this penalty effective: with a ReLU
the penalty's own gradient sees f'' = 0 almost everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pyadvk import _checks

REDUCTIONS = ("mean", "sum")


def _check_labels(x: torch.Tensor, y) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"y must be an integer tensor of class indices, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must have shape ({x.shape[0]},) (one label per sample of x, whose shape is "
            f"{tuple(x.shape)}), got {tuple(y.shape)}"
        )
    if y.device != x.device:
        raise ValueError(f"y must be on the device of x ({x.device}), got {y.device}")
    return y.long()


def input_gradient_penalty(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    zeta: float = 0.2,
    p: float = 2,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lipschitz-inspired input-gradient penalty (Woods et al. 2019), differentiable with respect to
    the model's parameters (double backpropagation).

    With logits ``z = model(x)`` of shape (B, C), each sample b gets one scalar ``s_b``:

    * with probability ``1 - zeta``: a logit chosen uniformly at random, ``s_b = z_b[j]``;
    * with probability ``zeta``: the margin ``s_b = z_b[y_b] - max_{j != y_b} z_b[j]``

    (independent draws per sample from ``generator``). With ``G = d(sum_b s_b)/dx`` (shape of x; row
    b is ``ds_b/dx_b`` when the model treats samples independently, e.g. BatchNorm in eval mode)
    the penalty is

    * ``reduction="mean"`` (default, the paper's): ``mean over b and over the D input values of
      |G|^p`` = ``(1/(B·D)) sum_b ||ds_b/dx_b||_p^p``, as in the paper's reference code
      (``input_grads.abs().pow(z).mean()``);
    * ``reduction="sum"``: ``(1/B) sum_b ||ds_b/dx_b||_p^p``, the p-th power of each sample's
      gradient p-norm averaged over the batch (= D times the "mean" value).

    Only input gradients are taken (``torch.autograd.grad`` with ``create_graph=True``); no
    parameter's ``.grad`` is touched, and calling ``backward()`` on the result (plus the CE loss)
    differentiates through the input gradient into the parameters. In training mode a BatchNorm
    couples the samples of the batch, and the gradient of the summed scores (what the paper's code
    computes) then mixes samples.

    Args:
        model: a callable mapping x to logits of shape (B, C), C >= 2.
        x: the input batch (B, ...), floating point; if it does not require grad, a detached copy
            that does is used (so x's own graph is left alone).
        y: integer labels of shape (B,), on x's device, in [0, C).
        zeta: probability of the margin score, in [0, 1] (0.2 in the paper).
        p: the exponent, > 0 (2 in the paper). For p < 1, |g|^p has an infinite derivative at 0.
        reduction: "mean" or "sum", see above.
        generator: torch.Generator on the logits' device, for the random choices.
        return_logits: also return the logits, so the caller can reuse this forward pass for the
            cross-entropy loss.
        check_values: check that every label is in [0, C) (one device sync on CUDA).

    Returns:
        The penalty (a 0-dim float32, or float64 for float64 logits, tensor), or
        ``(penalty, logits)`` with ``return_logits=True``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
    _checks.tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
    y = _check_labels(x, y)
    zeta = _checks.real("zeta", zeta, low=0.0)
    if zeta > 1:
        raise ValueError(f"zeta must be in [0, 1], got {zeta}")
    p = _checks.real("p", p, low=0.0, low_inclusive=False)
    if not math.isfinite(p):
        raise ValueError(f"p must be finite, got {p}")
    reduction = _checks.choice("reduction", reduction, REDUCTIONS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    inputs = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model(x) must return logits of shape ({x.shape[0]}, C), got {shape}")
        batch, classes = logits.shape
        if classes < 2:
            raise ValueError(f"model(x) must return at least 2 logits per sample (the margin needs 2), got {classes}")
        if check_values and bool(((y < 0) | (y >= classes)).any()):
            bad = int(y[(y < 0) | (y >= classes)][0])
            raise ValueError(f"y must hold class indices in [0, {classes}), got {bad}")
        device = logits.device
        # Draw order is fixed (random logit, then the margin coin), whatever zeta is.
        j = torch.randint(classes, (batch,), generator=generator, device=device)
        use_margin = torch.rand(batch, generator=generator, device=device) < zeta
        s_random = logits.gather(1, j[:, None])[:, 0]
        true = logits.gather(1, y[:, None])[:, 0]
        others = logits.masked_fill(torch.nn.functional.one_hot(y, classes).bool(), float("-inf")).amax(dim=1)
        s = torch.where(use_margin, true - others, s_random)
        (grad,) = torch.autograd.grad(s.sum(), inputs, create_graph=True)
        g = grad.double() if logits.dtype == torch.float64 else grad.float()
        values = g.abs().pow(p)
        penalty = values.mean() if reduction == "mean" else values.reshape(batch, -1).sum(1).mean()
    return (penalty, logits) if return_logits else penalty


class AdaptivePsi(nn.Module):
    """The adaptive weight of the input-gradient penalty (Woods et al. 2019)::

        psi = psi0 * exp(k * S)
        S  <- max(0, S + clip(-ln(L_CE / target_loss), -eps_neg, eps_pos))   (once per batch)

    Sign convention (the paper's reference code): while the cross-entropy is *below* the target the
    model can afford more regularization: ``-ln(L_CE/target) > 0``, S grows (by at most
    ``eps_pos`` per batch) and psi grows; above the target S shrinks, slowly (by at most
    ``eps_neg`` per batch), and never below 0, so psi >= psi0. A zero loss counts as the largest
    step (+eps_pos); an infinite one as -eps_neg.

    S is the buffer ``integral`` (float64, 0-dim): it is in the module's state_dict, moves with
    ``.to()`` and is restored by ``load_state_dict``. Under DistributedDataParallel every rank must
    make the same update: pass the loss averaged over ranks, or construct with ``sync=True`` so that
    :meth:`update` all-reduces (averages) the loss over the default process group itself when
    ``torch.distributed`` is initialized (a collective: every rank must call it).

    Args:
        psi0: psi at S = 0 (> 0; 220 in the paper).
        k: growth rate of psi in S (finite; 0.02).
        target_loss: target cross-entropy (> 0; 1.5).
        eps_pos: largest increase of S per batch (>= 0; 1).
        eps_neg: largest decrease of S per batch (>= 0; 0.01).
        sync: all-reduce the loss passed to :meth:`update` across ranks.
    """

    integral: torch.Tensor  # S, a registered buffer

    def __init__(
        self,
        psi0: float = 220.0,
        k: float = 0.02,
        target_loss: float = 1.5,
        eps_pos: float = 1.0,
        eps_neg: float = 0.01,
        *,
        sync: bool = False,
    ) -> None:
        super().__init__()
        self.psi0 = _checks.real("psi0", psi0, low=0.0, low_inclusive=False)
        self.k = _checks.real("k", k)
        self.target_loss = _checks.real("target_loss", target_loss, low=0.0, low_inclusive=False)
        self.eps_pos = _checks.real("eps_pos", eps_pos, low=0.0)
        self.eps_neg = _checks.real("eps_neg", eps_neg, low=0.0)
        for name in ("psi0", "k", "target_loss", "eps_pos", "eps_neg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        self.sync = sync
        self.register_buffer("integral", torch.zeros((), dtype=torch.float64))

    @property
    def psi(self) -> float:
        """The current weight ``psi0 * exp(k * S)``."""
        return self.psi0 * math.exp(self.k * float(self.integral))

    def forward(self) -> float:
        """The current weight (same as :attr:`psi`)."""
        return self.psi

    def _mean_loss(self, loss_ce: float | torch.Tensor) -> float:
        if isinstance(loss_ce, torch.Tensor):
            if loss_ce.numel() != 1:
                raise ValueError(f"loss_ce must be a scalar, got a tensor of shape {tuple(loss_ce.shape)}")
            loss = loss_ce.detach().reshape(()).to(torch.float64)
        else:
            loss = torch.tensor(_checks.real("loss_ce", loss_ce), dtype=torch.float64)
        if self.sync:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                loss = loss.to(self.integral.device).clone()
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)
                loss = loss / dist.get_world_size()
        value = float(loss)
        if math.isnan(value) or value < 0:
            raise ValueError(f"loss_ce must be a cross-entropy (>= 0, not NaN), got {value}")
        return value

    def step_size(self, loss_ce: float) -> float:
        """``clip(-ln(loss_ce / target_loss), -eps_neg, eps_pos)`` for one (already averaged) loss."""
        if loss_ce == 0:
            return self.eps_pos
        return min(self.eps_pos, max(-self.eps_neg, -math.log(loss_ce / self.target_loss)))

    @torch.no_grad()
    def update(self, loss_ce: float | torch.Tensor) -> float:
        """One batch's update of S with its cross-entropy ``loss_ce`` (a float or a scalar tensor;
        one device sync); returns the new psi."""
        loss = self._mean_loss(loss_ce)
        self.integral.fill_(max(0.0, float(self.integral) + self.step_size(loss)))
        return self.psi

    def extra_repr(self) -> str:
        return (
            f"psi0={self.psi0}, k={self.k}, target_loss={self.target_loss}, eps_pos={self.eps_pos}, "
            f"eps_neg={self.eps_neg}, sync={self.sync}"
        )
