"""Attacks on the fused ops, called as ``attack(images, labels) -> adv_images``.

Gradient attacks: :class:`PGD`, :class:`PGDL2`, :class:`FGSM`, :class:`EnsemblePGD`, and APGD
(:class:`APGD`, targeted :class:`APGDT`; Croce & Hein 2020) on the fused ``apgd_step``.
Minimal-perturbation attacks (``.minimal(images, labels) -> MinimalResult``): :class:`FAB`,
:class:`DeepFool`, and the paper's :class:`L2Min`. Score-based: :class:`Square` (no gradients).
:class:`AutoAttack` runs the standard ensemble (APGD-CE, APGD-T, FAB-T, Square) with a report.
"""

from pyadvk.attacks.apgd import APGD, APGDT, dlr_loss, dlr_loss_targeted
from pyadvk.attacks.autoattack import AutoAttack, AutoAttackReport
from pyadvk.attacks.deepfool import DeepFool
from pyadvk.attacks.ensemble import EnsemblePGD
from pyadvk.attacks.fab import FAB
from pyadvk.attacks.l2min import L2Min, L2MinResult
from pyadvk.attacks.minimal import MinimalResult
from pyadvk.attacks.pgd import FGSM, PGD, PGDL2, Attack
from pyadvk.attacks.square import Square

__all__ = [
    "APGD",
    "APGDT",
    "Attack",
    "AutoAttack",
    "AutoAttackReport",
    "DeepFool",
    "EnsemblePGD",
    "FAB",
    "FGSM",
    "L2Min",
    "L2MinResult",
    "MinimalResult",
    "PGD",
    "PGDL2",
    "Square",
    "dlr_loss",
    "dlr_loss_targeted",
]
