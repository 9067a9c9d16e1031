"""Training drop-ins: losses ``loss_fn(model, images, labels) -> loss`` for any training loop, and
a small :class:`AdversarialTrainer` around them."""

from pyadvk.train.adversarial import (
    fast_fgsm_loss,
    half_half,
    half_half_loss,
    pgd_adversarial_loss,
    reference_adversarial_images,
    reference_adversarial_loss,
    standard_loss,
)
from pyadvk.train.consistent import consistent_adversarial_loss, consistent_loss
from pyadvk.train.robust import RobustLoss, scaled_psi0
from pyadvk.train.trainer import AdversarialTrainer

__all__ = [
    "AdversarialTrainer",
    "RobustLoss",
    "consistent_adversarial_loss",
    "consistent_loss",
    "fast_fgsm_loss",
    "half_half",
    "half_half_loss",
    "pgd_adversarial_loss",
    "reference_adversarial_images",
    "reference_adversarial_loss",
    "scaled_psi0",
    "standard_loss",
]
