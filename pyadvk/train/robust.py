"""The robust additions of Woods et al. 2019 as one training loss.

Per batch: a random half of the images is replaced by adversarial images (half-half training),
then

    loss = CE(f(x), y) + ψ · mean |∂s/∂x|^p  (+ λ · LipschitzPenalty)

with the input-gradient penalty of :func:`pyadvk.lipschitz.input_gradient_penalty` (one forward
pass serves both terms; its gradient is taken with double backpropagation) and ψ from
:class:`pyadvk.lipschitz.AdaptivePsi`, updated with the batch's cross-entropy. The network itself
should use the half-Huber ReLU (``pyadvk.models.build(..., activation="half_huber")``): its second
derivative is non-zero, which the penalty's gradient needs.

The adversarial half (``attack=``):

* ``"pyadvk"`` (default): L∞ PGD-``steps`` with random start in the ball of ``eps`` (8/255), step
  ``alpha``, on exactly ``round(fraction·B)`` images chosen at random, attacked as a sub-batch.
* ``"reference"``: the paper's recipe as its reference code runs it: L2,min examples
  (:func:`pyadvk.train.adversarial.reference_adversarial_images` with ``l2min=True``) of RMS
  budget ``eps`` (0.1) in ``steps`` (7) linearly decaying steps from a zero start, no momentum,
  no clipping to the box, on the samples of a Bernoulli(``fraction``) mask drawn per sample, the
  attack running on the whole batch (the others keep δ = 0). Images never misclassified within
  the budget stay clean, as in the reference.

ψ's scale depends on the input size. The penalty is a mean over the ``D`` input values,
``mean |∂s/∂x|² = ‖∂s/∂x‖₂² / D``, so a fixed ψ weighs the gradient's norm ``D`` times more on an
input of ``D`` values than on CIFAR's ``3·32·32 = 3072``, for which the paper's ψ0 = 220 was tuned.
To put the paper's weight on the norm, scale ψ0 with ``D``: :func:`scaled_psi0` gives
``220 · D / 3072`` (18.3 for 16×16 digits, 4.6 for 8×8; ``pyadvk train --loss robust`` uses it
unless ``--psi0`` is given). The class's default stays the paper's 220 (``psi0=`` or ``psi=``
to change it). Measured (``pyadvk train --data digits --loss robust --activation half_huber
--epochs 3``, 16×16 digits, the shared 2-core CPU VM): with ψ0 = 18.3 the test accuracy after
epochs 1-3 is 0.32, 0.70, 0.87 (CE 1.48); with ψ0 = 220 it is 0.22, 0.13, 0.10, the network
flattened to a constant (penalty 2e-8, CE 2.302 = ln 10).

``loss_fn.last`` holds the last batch's terms: ``ce``, ``penalty`` and ``psi`` (0-dim tensors,
averaged per epoch by :class:`pyadvk.train.AdversarialTrainer`) and ``attacked``, the (B,) bool
mask of the images made adversarial.

In a torch.distributed process group the cross-entropy that updates ψ is averaged over the ranks
first, and the Lipschitz penalty's power-iteration state is broadcast from rank 0, so ψ and the
penalty are identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pyadvk import _checks, distributed
from pyadvk.attacks import PGD
from pyadvk.lipschitz import AdaptivePsi, LipschitzPenalty, input_gradient_penalty
from pyadvk.train.adversarial import _fraction, half_half, reference_adversarial_images

ATTACKS = ("pyadvk", "reference")
#: The paper's ψ0 (:class:`AdaptivePsi`'s default), tuned on CIFAR-10's inputs of 3·32·32 values.
PSI0_PAPER = 220.0
PSI0_PAPER_INPUT_VALUES = 3 * 32 * 32


def scaled_psi0(input_shape: Sequence[int]) -> float:
    """ψ0 for inputs of one sample's ``input_shape`` (no batch dim) that puts the paper's weight on
    the input gradient's norm: ``220 · D / 3072`` with ``D`` the number of input values (the
    penalty is a mean over them; see the module docstring). 220 for CIFAR's (3, 32, 32)."""
    shape = tuple(input_shape)
    if not shape or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
        raise ValueError(f"input_shape must be one sample's shape, positive ints (e.g. (3, 32, 32)), got {shape}")
    return PSI0_PAPER * math.prod(shape) / PSI0_PAPER_INPUT_VALUES


class RobustLoss(nn.Module):
    """``loss_fn(model, images, labels)`` for the robust additions; its state (ψ, the penalty's
    power iterations) is in ``state_dict()``, so :class:`AdversarialTrainer` checkpoints it.

    Args:
        attack: "pyadvk" (L∞ PGD on a sub-batch) or "reference" (the paper's L2,min on a
            Bernoulli mask over the whole batch); see the module docstring.
        eps, alpha, steps: the attack's radius (default 8/255 L∞ for "pyadvk", RMS budget 0.1 for
            "reference"), PGD's step (``"pyadvk"`` only) and the number of steps (``steps=0``:
            no attack).
        fraction: the share of each batch made adversarial (paper: 0.5): exactly for "pyadvk",
            the Bernoulli probability per sample for "reference".
        zeta, p: the input-gradient penalty's margin probability and exponent (paper: 0.2, 2).
        psi: the adaptive weight (default ``AdaptivePsi(psi0)`` with the paper's other constants).
        psi0: ψ at the start (default 220, the paper's for CIFAR's 3072 input values; scale it with
            the input size: :func:`scaled_psi0`); only without ``psi``.
        lipschitz_weight: weight λ of a :class:`LipschitzPenalty` on the spectral norms of
            ``model``'s layers (0: none), for one input of ``input_shape`` (no batch dim);
            ``lipschitz_kwargs`` go to its constructor (e.g. ``kind``, ``target``).
    """

    def __init__(
        self,
        *,
        attack: str = "pyadvk",
        eps: float | None = None,
        alpha: float = 2 / 255,
        steps: int = 7,
        fraction: float = 0.5,
        zeta: float = 0.2,
        p: float = 2.0,
        psi: AdaptivePsi | None = None,
        psi0: float | None = None,
        lipschitz_weight: float = 0.0,
        model: nn.Module | None = None,
        input_shape: Sequence[int] | None = None,
        lipschitz_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.attack = _checks.choice("attack", attack, ATTACKS)
        eps = (0.1 if self.attack == "reference" else 8 / 255) if eps is None else eps
        self.eps = _checks.real("eps", eps, low=0.0, low_inclusive=False)
        self.alpha = alpha
        self.steps = _checks.integer("steps", steps, low=0)
        self.fraction = _fraction(fraction)
        self.zeta, self.p = zeta, p
        if psi is not None and psi0 is not None:
            raise ValueError(f"give psi (an AdaptivePsi) or psi0 (its starting value), not both; got psi0={psi0}")
        self.psi = psi if psi is not None else AdaptivePsi(PSI0_PAPER if psi0 is None else psi0)
        self.lipschitz_weight = _checks.real("lipschitz_weight", lipschitz_weight, low=0.0)
        self.lipschitz: LipschitzPenalty | None = None
        if self.lipschitz_weight > 0:
            if model is None or input_shape is None:
                raise ValueError("lipschitz_weight > 0 needs model= and input_shape= (one sample's shape)")
            module = distributed.unwrap(model)
            device = next(module.parameters()).device
            self.lipschitz = LipschitzPenalty(module, input_shape, **(lipschitz_kwargs or {})).to(device)
            if distributed.is_distributed():
                for buf in self.lipschitz.buffers():
                    torch.distributed.broadcast(buf, src=0)
        self.generator = generator
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        attacked = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        if self.steps and self.fraction > 0 and self.attack == "reference":
            attacked = (torch.rand(images.shape[0], generator=self.generator) < self.fraction).to(images.device)
            images = reference_adversarial_images(
                distributed.unwrap(model), images, labels, eps=self.eps, steps=self.steps, l2min=True, affected=attacked
            )
        elif self.steps and self.fraction > 0:
            attack = PGD(distributed.unwrap(model), eps=self.eps, alpha=self.alpha, steps=self.steps)
            images, idx = half_half(
                images, labels, attack, fraction=self.fraction, generator=self.generator, return_index=True
            )
            attacked[idx] = True
        penalty, logits = input_gradient_penalty(
            model,
            images,
            labels,
            zeta=self.zeta,
            p=self.p,
            generator=self.generator,
            return_logits=True,
            check_values=False,
        )
        ce = nn.functional.cross_entropy(logits.float(), labels)
        # psi is updated with the batch's loss before weighting the penalty (the paper's code);
        # under DDP with the loss averaged over ranks, so every rank holds the same psi.
        psi = self.psi.update(distributed.all_reduce_mean_(ce.detach().clone()))
        loss = ce + psi * penalty
        if self.lipschitz is not None:
            loss = loss + self.lipschitz_weight * self.lipschitz()
        self.last = {"ce": ce.detach(), "penalty": penalty.detach(), "psi": torch.tensor(psi), "attacked": attacked}
        return loss
