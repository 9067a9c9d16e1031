"""Attacks on the fused ops, called as ``attack(images, labels) -> adv_images``."""

from pyadvk.attacks.pgd import FGSM, PGD, PGDL2, Attack

__all__ = ["Attack", "FGSM", "PGD", "PGDL2"]
