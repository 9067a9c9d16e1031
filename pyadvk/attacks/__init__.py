"""Attacks on the fused ops, called as ``attack(images, labels) -> adv_images``."""

from pyadvk.attacks.ensemble import EnsemblePGD
from pyadvk.attacks.l2min import L2Min, L2MinResult
from pyadvk.attacks.pgd import FGSM, PGD, PGDL2, Attack

__all__ = ["Attack", "EnsemblePGD", "FGSM", "L2Min", "L2MinResult", "PGD", "PGDL2"]
