"""The ensemble-optimization attack (Liu et al. 2017), as used by Dong et al. 2017 to make
adversarial images that are not specific to one model.

For models f_1..f_M with weights w_i >= 0 (normalized to sum 1), the ensemble's probability of
class c is the weighted mixture of the models' softmax outputs,

    P(c | x) = Σ_i w_i · softmax(f_i(x))[c],

and the attack runs PGD on the loss

    L(x) = −log P(t | x)     targeted: minimized, so every model moves towards t,
    L(x) = −log P(y | x)     untargeted: maximized, so the mixture's mass leaves y,

averaged over the batch. It is computed stably as −logsumexp_i(log w_i + log_softmax(f_i(x))).
With a single model, ``−log softmax(f(x))[y]`` is the cross-entropy, so ``EnsemblePGD([model])``
gives the same images as :class:`pyadvk.attacks.PGD` with its default cross-entropy loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._modules import eval_mode
from pyadvk.attacks.pgd import PGD
from pyadvk.nn.normalize import NormalizeArg, with_normalization


def ensemble_log_prob(logits: Sequence[torch.Tensor], log_weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log Σ_i w_i · softmax(logits_i)[labels]`` per sample, shape (B,).

    Args:
        logits: M tensors of shape (B, C), one per model.
        log_weights: (M,) the logs of the weights (which sum to 1).
        labels: (B,) class indices.
    """
    log_probs = torch.stack([torch.log_softmax(z.float(), dim=1) for z in logits])  # (M, B, C)
    picked = log_probs.gather(2, labels.view(1, -1, 1).expand(len(logits), -1, 1)).squeeze(2)
    return torch.logsumexp(picked + log_weights.to(picked.device).view(-1, 1), dim=0)


class EnsemblePGD(PGD):
    """PGD on a weighted ensemble of models: ``EnsemblePGD([f1, f2], eps=8/255, alpha=2/255,
    steps=10)(images, labels)``.

    Every step is pyadvk's fused in-place step (:func:`pyadvk.ops.pgd_step_`) from the fused
    random start (:func:`pyadvk.ops.random_init`) when ``random_start``; the gradient is taken
    with respect to the input only (``torch.autograd.grad``), so no parameter ``.grad`` is touched.

    Unlike :class:`PGD`, which leaves the model's mode as the caller set it, the models run in eval
    mode during the attack (an ensemble attack is an analysis tool: batch-norm statistics must not
    change) and each module's train/eval mode is restored afterwards, also when the attack fails.

    Args:
        models: a non-empty sequence of models mapping images (B, ...) to logits (B, C), all with the
            same number of classes C.
        weights: one weight >= 0 per model, not all zero; normalized to sum 1. Default uniform.
        eps, alpha, steps, norm, targeted, random_start, lower, upper: as for :class:`PGD`.
            With ``targeted=True`` the second argument of the call holds the target classes.
        backend: force a body of the fused step ("cuda", "triton", "cpp", "torch").
        generator: the random generator of the random start.
        normalize: ``(mean, std)`` for models that expect normalized inputs: every model is
            attacked as ``Normalize(mean, std) ∘ model`` (see :class:`pyadvk.attacks.pgd.Attack`).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        weights: Sequence[float] | torch.Tensor | None = None,
        *,
        eps: float | torch.Tensor,
        alpha: float | torch.Tensor,
        steps: int,
        norm: str = "linf",
        targeted: bool = False,
        random_start: bool = True,
        lower: float = 0.0,
        upper: float = 1.0,
        backend: str | None = None,
        generator: torch.Generator | None = None,
        normalize: NormalizeArg = None,
    ) -> None:
        if isinstance(models, (nn.Module, str)) or not isinstance(models, Sequence):
            raise TypeError(f"models must be a list or tuple of models, got {type(models).__name__}")
        if len(models) == 0:
            raise ValueError("models must hold at least one model, got an empty sequence")
        for i, model in enumerate(models):
            if not callable(model):
                raise TypeError(f"models[{i}] must be callable (an nn.Module), got {type(model).__name__}")
        super().__init__(
            models[0],
            eps,
            alpha,
            steps,
            random_start,
            norm=norm,
            targeted=targeted,
            lower=lower,
            upper=upper,
            backend=backend,
            generator=generator,
            normalize=normalize,
        )
        self.models = [with_normalization(model, self.normalize) for model in models]
        self.weights = self._normalized_weights(weights, len(self.models))
        self._log_weights = torch.log(self.weights)  # -inf for zero weights: logsumexp ignores them

    @staticmethod
    def _normalized_weights(weights, count: int) -> torch.Tensor:
        if weights is None:
            return torch.full((count,), 1.0 / count, dtype=torch.float32)
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1 or not weights.is_floating_point():
                raise ValueError(
                    f"weights must be a 1-D floating tensor (one weight per model), got a {weights.dtype} "
                    f"tensor of shape {tuple(weights.shape)}"
                )
            values = [float(w) for w in weights.detach().cpu()]
        elif isinstance(weights, Sequence) and not isinstance(weights, str):
            values = [_checks.real(f"weights[{i}]", w) for i, w in enumerate(weights)]
        else:
            raise TypeError(f"weights must be a sequence of numbers or a tensor, got {type(weights).__name__}")
        if len(values) != count:
            raise ValueError(f"weights must hold one weight per model ({count}), got {len(values)}")
        for i, w in enumerate(values):
            if not w >= 0.0 or w == float("inf"):  # also NaN
                raise ValueError(f"weights[{i}] must be a finite number >= 0, got {w}")
        total = sum(values)
        if total <= 0.0:
            raise ValueError(f"weights must not all be zero, got {values}")
        return torch.tensor([w / total for w in values], dtype=torch.float32)

    def guarded_models(self) -> list[nn.Module]:
        return self.models

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.models):
            return super().forward(images, labels)

    def input_grad(self, x: torch.Tensor, labels: torch.Tensor, first: bool = False) -> torch.Tensor:
        """Gradient of the ensemble objective with respect to the input only (to ascend)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = [model(x) for model in self.models]
            if first:
                for z in logits:
                    self.check_logits(z, labels)
                classes = {z.shape[1] for z in logits}
                if len(classes) > 1:
                    raise ValueError(
                        f"models must all return the same number of classes, got {[z.shape[1] for z in logits]}"
                    )
            loss = -ensemble_log_prob(logits, self._log_weights, labels).mean()
            if self.targeted:
                loss = -loss
            (grad,) = torch.autograd.grad(loss, x)
        return grad

    def __repr__(self) -> str:
        return (
            f"EnsemblePGD(models={len(self.models)}, weights={self.weights.tolist()}, eps={self.eps!r}, "
            f"alpha={self.alpha!r}, steps={self.steps}, norm={self.norm!r}, targeted={self.targeted}, "
            f"random_start={self.random_start}, lower={self.lower}, upper={self.upper})"
        )
