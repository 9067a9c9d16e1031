"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): robust accuracy as the worst case over a fixed ensemble.

Components per ``version`` (as the paper and the reference's public documentation describe them):

* ``standard``: APGD-CE (100 steps, no restarts), APGD-T (targeted DLR, the 9 most likely other
  classes), FAB-T (9 targets), Square (5000 queries).
* ``plus``: APGD-CE and APGD-DLR (5 restarts each), FAB (untargeted, 5 restarts), Square
  (5 restarts), APGD-T, FAB-T.
* ``rand`` (randomized defences): APGD-CE and APGD-DLR with expectation over 20 draws
  (``eot_iter=20``) per gradient.

Images the model misclassifies clean are never attacked. Each component attacks only the images
every earlier one failed on, and an image's result is the first successful adversarial image
(its worst case), else the clean image. Every component's output is projected onto the
threat model (the eps-ball around the image, then the box) before it is judged, so a returned
image is always admissible. With ``n_classes < 10`` the targeted components use
``n_classes − 1`` targets (said in the report).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from pyadvk import _checks
from pyadvk.attacks.pgd import Attack
from pyadvk.attacks.square import Square
from pyadvk.nn.normalize import NormalizeArg

VERSIONS = ("standard", "plus", "rand")
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSION_COMPONENTS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
TARGETS = 9  # target classes of APGD-T and FAB-T (the top 9 other classes)
# The DLR losses read the third (untargeted) and fourth (targeted) largest logits.
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class ComponentReport:
    """One component's share of the evaluation.

    ``robust_accuracy``: the share of all images still correctly classified after this component
    (and every earlier one); ``images_attacked``: how many it was run on (the ones still
    standing); ``images_broken``: how many of those it broke; ``seconds``: its wall-clock time.
    """

    name: str
    robust_accuracy: float
    images_attacked: int
    images_broken: int
    seconds: float


@dataclasses.dataclass
class AutoAttackReport:
    """The result of one AutoAttack call: clean accuracy, robust accuracy after each component (non-
    increasing: each component only removes images), and the final robust accuracy (the last
    component's, or the clean accuracy when no component ran)."""

    version: str
    norm: str
    eps: float
    n_images: int
    n_classes: int
    n_target_classes: int
    clean_accuracy: float
    components: list[ComponentReport]
    robust_accuracy: float
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"AutoAttack ({self.version}, {self.norm}, eps={self.eps:g}) on {self.n_images} images, "
            f"{self.n_classes} classes",
            f"  clean accuracy:        {100 * self.clean_accuracy:6.2f}%",
        ]
        for c in self.components:
            lines.append(
                f"  after {c.name + ':':<16}{100 * c.robust_accuracy:6.2f}%  (attacked {c.images_attacked}, "
                f"broke {c.images_broken}, {c.seconds:.2f} s)"
            )
        lines.append(f"  robust accuracy:       {100 * self.robust_accuracy:6.2f}%  (total {self.seconds:.2f} s)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class AutoAttack(Attack):
    """The AutoAttack ensemble, called as ``aa(images, labels) -> adv_images``.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, n_classes); used in the mode
            the caller set, with input gradients only.
        norm: "linf" or "l2".
        eps: radius of the threat model (>= 0).
        version: "standard", "plus" or "rand" (the components listed in the module docstring).
        n_classes: the model's number of classes (>= 2); the targeted components use
            ``min(9, n_classes − 1)`` targets.
        seed: the seed of every component.
        lower, upper: the valid input range.
        backend, autocast, channels_last, cuda_graph: passed to the APGD components (the fused
            step's body and the fast modes of :class:`pyadvk.attacks.PGD`); autocast and
            channels_last to the FAB components too (Square reads no gradient and runs as given).
        attacks: component names to run instead of the version's list, in this order, each with
            the version's settings; one of ``COMPONENTS``.
        progress: show a tqdm progress bar over the components.
        normalize: ``(mean, std)`` for a model that expects normalized inputs (see
            :class:`pyadvk.attacks.pgd.Attack`); every component attacks ``Normalize ∘ model``,
            so eps and the images stay in pixel space.

    After a call, ``report`` is an :class:`AutoAttackReport`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float,
        version: str = "standard",
        n_classes: int = 10,
        seed: int = 0,
        lower: float = 0.0,
        upper: float = 1.0,
        backend: str | None = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        attacks: list[str] | tuple[str, ...] | None = None,
        progress: bool = False,
        normalize: NormalizeArg = None,
    ) -> None:
        super().__init__(
            model,
            eps=_checks.real("eps", eps, low=0.0),
            norm=norm,
            lower=lower,
            upper=upper,
            backend=backend,
            autocast=autocast,
            channels_last=channels_last,
            normalize=normalize,
        )
        self.version = _checks.choice("version", version, VERSIONS)
        self.n_classes = _checks.integer("n_classes", n_classes, low=2)
        self.seed = _checks.integer("seed", seed)
        self.cuda_graph = bool(cuda_graph)
        self.progress = bool(progress)
        self.skipped: list[str] = []
        if attacks is None:
            names = VERSION_COMPONENTS[self.version]
            self.skipped = [a for a in names if self.n_classes < MIN_CLASSES.get(a, 2)]
            names = tuple(a for a in names if a not in self.skipped)
        else:
            if isinstance(attacks, str) or not isinstance(attacks, (list, tuple)):
                raise TypeError(f"attacks must be a list of component names, got {type(attacks).__name__}")
            names = tuple(_checks.choice("attacks", a, COMPONENTS) for a in attacks)
            if len(set(names)) != len(names):
                raise ValueError(f"attacks must not repeat a component, got {list(attacks)}")
            for a in names:
                if self.n_classes < MIN_CLASSES.get(a, 2):
                    raise ValueError(
                        f"attacks: {a!r} needs at least {MIN_CLASSES[a]} classes (its DLR loss), got n_classes="
                        f"{self.n_classes}"
                    )
        self.attacks = tuple(names)
        self.n_target_classes = min(TARGETS, self.n_classes - 1)
        self._components: list[tuple[str, AttackFn]] | None = None
        self.report: AutoAttackReport | None = None

    @property
    def components(self) -> list[tuple[str, AttackFn]]:
        """``(name, attack)`` pairs run in order (built on first use)."""
        if self._components is None:
            self._components = [(name, self.build(name)) for name in self.attacks]
        return self._components

    @components.setter
    def components(self, value: list[tuple[str, AttackFn]]) -> None:
        self._components = list(value)

    def build(self, name: str) -> AttackFn:
        """The component ``name`` with this version's settings."""
        restarts = 5 if self.version == "plus" and name in ("apgd-ce", "apgd-dlr", "fab", "square") else 1
        eps = float(self.eps)
        if name in ("apgd-ce", "apgd-dlr", "apgd-t"):
            from pyadvk.attacks.apgd import APGD, APGDT

            if name == "apgd-t":
                return APGDT(
                    self.model,
                    norm=self.norm,
                    eps=eps,
                    steps=100,
                    n_target_classes=self.n_target_classes,
                    restarts=1,
                    seed=self.seed,
                    lower=self.lower,
                    upper=self.upper,
                    backend=self.backend,
                    autocast=self.autocast,
                    channels_last=self.channels_last,
                    cuda_graph=self.cuda_graph,
                )
            return APGD(
                self.model,
                norm=self.norm,
                eps=eps,
                steps=100,
                restarts=restarts,
                loss="ce" if name == "apgd-ce" else "dlr",
                seed=self.seed,
                eot_iter=20 if self.version == "rand" else 1,
                lower=self.lower,
                upper=self.upper,
                backend=self.backend,
                autocast=self.autocast,
                channels_last=self.channels_last,
                cuda_graph=self.cuda_graph,
            )
        if name in ("fab", "fab-t"):
            from pyadvk.attacks.fab import FAB

            targeted = name == "fab-t"
            return FAB(
                self.model,
                norm=self.norm,
                eps=eps,
                steps=100,
                targeted=targeted,
                n_target_classes=self.n_target_classes,
                restarts=1 if targeted else restarts,
                seed=self.seed,
                lower=self.lower,
                upper=self.upper,
                autocast=self.autocast,
                channels_last=self.channels_last,
            )
        return Square(
            self.model,
            norm=self.norm,
            eps=eps,
            n_queries=5000,
            p_init=0.8,
            restarts=restarts,
            loss="margin",
            seed=self.seed,
            lower=self.lower,
            upper=self.upper,
        )

    # ----------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        n = images.shape[0]
        adv = images.clone()
        with torch.no_grad():
            logits = self.model(images)
        self.check_logits(logits, labels)
        if logits.shape[1] != self.n_classes:
            raise ValueError(
                f"n_classes must be the model's number of outputs ({logits.shape[1]}), got {self.n_classes}"
            )
        robust = logits.argmax(1) == labels
        clean_accuracy = _share(robust)
        reports: list[ComponentReport] = []
        components = self.components
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(components), desc="AutoAttack", unit="attack")
        for name, attack in components:
            if bar is not None:
                bar.set_postfix_str(f"{name}, robust {100 * _share(robust):.1f}%")
            t0 = time.perf_counter()
            idx = robust.nonzero().squeeze(1)
            broke = 0
            if idx.numel() and self.eps > 0:
                x, y = images[idx], labels[idx]
                x_adv = self.project(attack(x, y), x)
                with torch.no_grad():
                    fooled = self.model(x_adv).argmax(1) != y
                adv[idx[fooled]] = x_adv[fooled]
                robust[idx[fooled]] = False
                broke = int(fooled.sum())
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            reports.append(
                ComponentReport(
                    name=name,
                    robust_accuracy=_share(robust),
                    images_attacked=int(idx.numel()) if self.eps > 0 else 0,
                    images_broken=broke,
                    seconds=time.perf_counter() - t0,
                )
            )
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_postfix_str(f"robust {100 * _share(robust):.1f}%")
            bar.close()
        notes = []
        if self.n_target_classes < TARGETS and any(name.endswith("-t") for name, _ in components):
            notes.append(
                f"targeted components use {self.n_target_classes} target classes (n_classes - 1), not {TARGETS}"
            )
        for a in self.skipped:
            need = MIN_CLASSES[a]
            notes.append(f"{a} skipped: its DLR loss needs at least {need} classes, the model has {self.n_classes}")
        if self.eps == 0:
            notes.append("eps = 0: no component was run; robust accuracy is the clean accuracy")
        self.report = AutoAttackReport(
            version=self.version,
            norm=self.norm,
            eps=float(self.eps),
            n_images=n,
            n_classes=self.n_classes,
            n_target_classes=self.n_target_classes,
            clean_accuracy=clean_accuracy,
            components=reports,
            robust_accuracy=_share(robust),
            seconds=time.perf_counter() - start,
            notes=notes,
        )
        return adv

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_adv`` projected onto the threat model: the eps-ball around ``x`` (L∞: clamp; L2:
        rescale to norm ≤ eps), then the box. A no-op (up to rounding) for admissible images."""
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
            shape = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
            raise ValueError(f"a component returned adversarial images of shape {shape}, expected {tuple(x.shape)}")
        eps = float(self.eps)
        delta = x_adv.detach().to(x.dtype) - x
        if self.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            norm = delta.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            delta = delta * torch.clamp(eps / norm, max=1.0).view((-1,) + (1,) * (x.dim() - 1))
        return (x + delta).clamp(self.lower, self.upper)


def _share(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 0.0
