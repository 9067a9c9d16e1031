"""A robustness evaluation that says when not to trust it.

:func:`evaluate` measures, on the first ``n`` images of a loader,

* the clean accuracy;
* the robust accuracy after each attack of a list run as a cascade: attack ``k`` runs only on the
  images that every earlier attack failed on (and that the model classifies correctly), so the
  robust accuracy after the last attack is the worst case per image and over attacks,
  ``#{i : f(x_i) = y_i and f(A_k(x_i)) = y_i for every k} / n``, as AutoAttack reports it;
* the seconds each attack took;

and runs the checks for the usual signs of a masked or broken evaluation (Carlini et al. 2019, "On
evaluating adversarial robustness"; Athalye et al. 2018, "Obfuscated gradients give a false sense of
security"; Croce & Hein 2020), each a :class:`Check` with its numbers and ``pass``/``warn``:

``black_box``
    a gradient-free attack (Square) broke images that every gradient attack before it failed on:
    the gradients do not point where the loss goes up (masked or obfuscated gradients).
``eps_sweep``
    robust accuracy over a sweep of budgets (by default ``eps × [0.25, 0.5, 1, 2, 4, 16]``, APGD-CE or
    PGD at each) must not increase with the budget, and must fall to the chance level ``1/C`` or
    below at the largest one (an unbounded attack can always reach another class).
``zero_gradients``
    the share of images whose input gradient of the cross-entropy is exactly zero, or not finite,
    is above a threshold: gradient attacks cannot move from there (a flat or saturated model).
``randomness``
    two identical forward passes on the same images give different logits: the model is randomized
    (or left in train mode with dropout); evaluate it with expectation over transformation
    (``AutoAttack(version="rand")``, ``APGD(eot_iter=20)``).
``budget``
    every adversarial image an attack returned lies in the eps-ball around its image and in the box
    (images outside are not counted as broken).

A passing check does not prove a model robust: a warning proves the evaluation is not to be
trusted as it stands.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pyadvk import _checks
from pyadvk._modules import guarded, model_device
from pyadvk.attacks.apgd import APGD
from pyadvk.attacks.autoattack import MIN_CLASSES, AutoAttack
from pyadvk.attacks.pgd import PGD
from pyadvk.attacks.square import Square
from pyadvk.metrics.ara import check_attack_normalization
from pyadvk.nn.normalize import NormalizeArg, with_normalization

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PRESETS = ("autoattack", "apgd", "pgd")
NORMS = ("linf", "l2")
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)
_DISPLAY = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab": "FAB", "fab-t": "FAB-T"}


def is_black_box(attack: object) -> bool:
    """True for an attack that never reads a gradient: :class:`pyadvk.attacks.Square`, or any
    object with a true ``black_box`` attribute."""
    return isinstance(attack, Square) or bool(getattr(attack, "black_box", False))


@dataclass
class AttackResult:
    """One attack of the cascade: ``attacked`` images (those every earlier attack failed on),
    ``broken`` of them newly misclassified within budget, the robust accuracy after it (over all
    ``n`` images), its wall-clock ``seconds``, and ``out_of_budget`` images it returned outside the
    eps-ball or the box (not counted as broken)."""

    name: str
    black_box: bool
    attacked: int
    broken: int
    robust_accuracy: float
    seconds: float
    out_of_budget: int = 0

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Check:
    """A warning sign of a masked or broken evaluation: ``status`` is "pass", "warn", or "skipped"
    (could not run, ``message`` says why); ``values`` holds the numbers it decided on."""

    name: str
    status: str
    message: str
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "values": self.values}


@dataclass
class Evaluation:
    """The result of :func:`evaluate`. ``broken_by`` (n,) int64: per image, the index of the first
    attack that broke it, ``-1`` if none did, ``-2`` if the clean image is misclassified."""

    norm: str
    eps: float
    n: int
    num_classes: int
    clean_accuracy: float
    attacks: list[AttackResult]
    robust_accuracy: float
    checks: list[Check]
    sweep_attack: str = ""
    sweep_eps: list[float] = field(default_factory=list)
    sweep_accuracy: list[float] = field(default_factory=list)
    broken_by: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    @property
    def trustworthy(self) -> bool:
        """No check warned (skipped checks do not count against it)."""
        return not self.warnings

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; the checks are {', '.join(c.name for c in self.checks)}")

    def to_dict(self) -> dict:
        return {
            "norm": self.norm,
            "eps": self.eps,
            "n": self.n,
            "num_classes": self.num_classes,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "attacks": [a.to_dict() for a in self.attacks],
            "sweep": {"attack": self.sweep_attack, "eps": self.sweep_eps, "accuracy": self.sweep_accuracy},
            "checks": [c.to_dict() for c in self.checks],
            "trustworthy": self.trustworthy,
        }

    def to_markdown(self) -> str:
        lines = [
            "# Robustness evaluation",
            "",
            f"{self.n} images, {self.norm} eps = {self.eps:.6g}, {self.num_classes} classes.",
            "",
            "| attack | images attacked | broken | robust accuracy after it | seconds |",
            "|---|---:|---:|---:|---:|",
            f"| (clean) | {self.n} | {self.n - round(self.clean_accuracy * self.n)} | {self.clean_accuracy:.4f} | |",
        ]
        for a in self.attacks:
            extra = f" ({a.out_of_budget} outside the budget)" if a.out_of_budget else ""
            lines.append(f"| {a.name} | {a.attacked} | {a.broken}{extra} | {a.robust_accuracy:.4f} | {a.seconds:.2f} |")
        lines += [
            "",
            f"**Worst-case robust accuracy: {self.robust_accuracy:.4f}** (an image counts as robust only if "
            "every attack failed on it).",
            "",
            "## Checks",
            "",
            "| check | status | finding |",
            "|---|---|---|",
        ]
        lines += [f"| {c.name} | {c.status.upper()} | {c.message} |" for c in self.checks]
        if self.sweep_eps:
            lines += ["", f"## Budget sweep ({self.sweep_attack})", "", "| eps | robust accuracy |", "|---:|---:|"]
            lines += [f"| {e:.6g} | {a:.4f} |" for e, a in zip(self.sweep_eps, self.sweep_accuracy)]
        verdict = (
            "No warning sign: the checks found nothing wrong (which does not prove robustness)."
            if self.trustworthy
            else "Do not trust these numbers as they stand: "
            + "; ".join(f"{c.name}: {c.message}" for c in self.warnings)
        )
        lines += ["", "## Verdict", "", verdict, ""]
        return "\n".join(lines)


def _collect(loader: DataLoader, n: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first ``n`` images and labels of ``loader`` (all for None), on the CPU, and its batch size."""
    images, labels, batch = [], [], 0
    seen = 0
    for x, y in loader:
        if n is not None:
            x, y = x[: n - seen], y[: n - seen]
        batch = max(batch, len(x))
        images.append(x.detach().cpu())
        labels.append(torch.as_tensor(y).detach().cpu())
        seen += len(x)
        if n is not None and seen >= n:
            break
    if not seen:
        raise ValueError("loader yielded no images")
    return torch.cat(images), torch.cat(labels).long(), batch


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def _distance(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.reshape(delta.shape[0], -1).float()
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def _chunks(index: torch.Tensor, size: int):
    return index.split(size) if index.numel() else ()


def _preset(
    name: str, model: nn.Module, norm: str, eps: float, num_classes: int, steps: int, seed: int, device: torch.device
) -> list[tuple[str, AttackFn]]:
    """The ``(name, attack)`` pairs of a preset: AutoAttack's own components with its settings for
    "autoattack" (standard version) and "apgd" (its APGD-CE and APGD-T), PGD-``steps`` for "pgd"."""
    if name == "pgd":
        generator = torch.Generator(device=device).manual_seed(seed)
        pgd = PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm, generator=generator)
        return [(f"PGD-{steps}", pgd)]
    names = None
    if name == "apgd":  # APGD-T's targeted DLR loss needs 4 classes
        names = [a for a in ("apgd-ce", "apgd-t") if num_classes >= MIN_CLASSES.get(a, 2)]
    aa = AutoAttack(model, norm=norm, eps=eps, version="standard", n_classes=num_classes, seed=seed, attacks=names)
    return [(_DISPLAY.get(a, "Square"), attack) for a, attack in aa.components]


def _sweep_attack(preset: str | None, model: nn.Module, norm: str, eps: float, steps: int, seed: int, device):
    """APGD-CE-``steps`` at ``eps`` (PGD-``steps`` when the evaluation itself is PGD's)."""
    if preset != "pgd":
        return f"APGD-CE-{steps}", APGD(model, norm=norm, eps=eps, steps=steps, loss="ce", seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    return f"PGD-{steps}", PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm, generator=generator)


def sweep_check(eps: Sequence[float], accuracy: Sequence[float], num_classes: int, n: int) -> Check:
    """Check ``eps_sweep`` from its numbers: robust accuracy over increasing ``eps`` must be
    non-increasing and end at ``1/num_classes`` or below, each up to a tolerance of
    ``max(1/n, 0.01)`` (one image, or one percentage point on large sets)."""
    tol = max(1.0 / n, 0.01)
    chance = 1.0 / num_classes
    rises = [
        (eps[i], accuracy[i], eps[i + 1], accuracy[i + 1])
        for i in range(len(eps) - 1)
        if accuracy[i + 1] > accuracy[i] + tol
    ]
    values = {"eps": list(eps), "accuracy": list(accuracy), "chance": chance, "tolerance": tol}
    problems = []
    if rises:
        e0, a0, e1, a1 = rises[0]
        problems.append(
            f"robust accuracy rises with the budget ({a0:.3f} at eps {e0:.4g} -> {a1:.3f} at eps {e1:.4g}): "
            "the attack is not converging or the gradients are masked"
        )
    if accuracy[-1] > chance + tol:
        problems.append(
            f"at eps {eps[-1]:.4g} robust accuracy is still {accuracy[-1]:.3f}, above chance {chance:.3f}: "
            "an attack that cannot win with an unbounded budget is failing, not the model resisting"
        )
    values["rises"] = len(rises)
    if problems:
        return Check("eps_sweep", "warn", "; ".join(problems), values)
    return Check(
        "eps_sweep",
        "pass",
        f"non-increasing over {len(eps)} budgets, {accuracy[-1]:.3f} (chance {chance:.3f}) at eps {eps[-1]:.4g}",
        values,
    )


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    norm: str = "linf",
    eps: float,
    attacks: str | Sequence[tuple[str, AttackFn]] = "autoattack",
    n: int | None = None,
    eps_sweep: Sequence[float] | None = None,
    steps: int = 100,
    sweep_steps: int = 20,
    grad_threshold: float = 0.01,
    device: torch.device | str | None = None,
    seed: int = 0,
    lower: float = 0.0,
    upper: float = 1.0,
    progress: bool = True,
    normalize: NormalizeArg = None,
) -> Evaluation:
    """Robust accuracy of ``model`` on the first ``n`` images of ``loader`` (all for None) under
    ``attacks``, with the checks of the module docstring.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, C); used in the mode the caller
            set (call ``model.eval()`` first), its parameters' ``.grad`` untouched.
        norm, eps: the threat model, ``‖x_adv − x‖ ≤ eps`` in "linf" or "l2".
        attacks: "autoattack" (APGD-CE, APGD-T, FAB-T, Square: the components of
            ``AutoAttack(version="standard")`` run as a cascade), "apgd" (its APGD-CE, APGD-T),
            "pgd" (PGD-``steps``, random start, step ``2.5·eps/steps``), or a list of
            ``(name, attack)`` pairs, ``attack(images, labels) -> adv_images``; a black-box one
            (see :func:`is_black_box`) feeds the ``black_box`` check.
        eps_sweep: budgets of the ``eps_sweep`` check (default ``eps × [0.25, 0.5, 1, 2, 4, 16]``;
            an empty list skips it), each attacked with APGD-CE-``sweep_steps`` (PGD for
            ``attacks="pgd"`` or where APGD is missing).
        steps: iterations of PGD for ``attacks="pgd"`` (the "autoattack" and "apgd" presets keep
            AutoAttack's settings: 100 iterations, 5000 Square queries).
        grad_threshold: the ``zero_gradients`` check warns above this share of images.
        seed: seeds the presets' random starts and searches.
        normalize: ``(mean, std)`` for a model that expects ``(x − mean) / std``: everything runs
            on ``Normalize(mean, std) ∘ model``, so the images, eps and the budget check stay in
            pixel space; attacks given as pairs must be built with the same ``normalize=``.

    Returns an :class:`Evaluation`. The images are gathered on the CPU and attacked in batches of
    the loader's batch size on ``device`` (default: the model's). The model's buffers and train/eval
    flags are left as found, and a call under ``torch.inference_mode()`` works.
    """
    norm = _checks.choice("norm", norm, NORMS)
    eps = _checks.real("eps", eps, low=0.0, low_inclusive=False)
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps}")
    lower, upper = _checks.bounds(lower, upper)
    if n is not None:
        _checks.integer("n", n, low=1)
    steps = _checks.integer("steps", steps, low=1)
    sweep_steps = _checks.integer("sweep_steps", sweep_steps, low=1)
    grad_threshold = _checks.real("grad_threshold", grad_threshold, low=0.0)
    seed = _checks.integer("seed", seed)
    preset: str | None = None
    if isinstance(attacks, str):
        preset = _checks.choice("attacks", attacks, PRESETS)
        pairs: list[tuple[str, AttackFn]] = []
    else:
        pairs = list(attacks)
        if not pairs:
            raise ValueError("attacks must name a preset or hold at least one (name, attack) pair, got an empty list")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and callable(pair[1])):
                raise TypeError(
                    f"attacks[{i}] must be a (name, attack) pair, attack(images, labels) -> adv_images; got {pair!r}"
                )
    if eps_sweep is None:
        sweep_eps = [f * eps for f in SWEEP_FACTORS]
    else:
        sweep_eps = [_checks.real(f"eps_sweep[{i}]", e, low=0.0, low_inclusive=False) for i, e in enumerate(eps_sweep)]
        if sweep_eps != sorted(sweep_eps):
            raise ValueError(f"eps_sweep must be increasing, got {sweep_eps}")
    device = torch.device(device) if device is not None else model_device(model)

    model = with_normalization(model, normalize)
    for _, attack in pairs:
        check_attack_normalization(attack, model)
    with guarded([model]):
        images, labels, batch = _collect(loader, n)
        total = len(labels)
        lo, hi = float(images.min()), float(images.max())
        if lo < lower or hi > upper:
            raise ValueError(
                f"images must lie in [lower, upper] = [{lower}, {upper}], got values in [{lo:.4g}, {hi:.4g}]"
            )
        with torch.no_grad():
            first = model(images[:batch].to(device))
        if not isinstance(first, torch.Tensor) or first.dim() != 2 or first.shape[0] != min(batch, total):
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"model must return logits of shape (B, C), got {shape} for a batch of {min(batch, total)}"
            )
        num_classes = first.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"labels must be classes in [0, {num_classes}) (the model's logits), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if preset is not None:
            pairs = _preset(preset, model, norm, eps, num_classes, steps, seed, device)

        checks = [_randomness_check(model, images[:batch].to(device), first)]
        correct = torch.cat([_predict(model, images[i : i + batch].to(device)).cpu() for i in range(0, total, batch)])
        correct = correct == labels
        broken_by = torch.where(correct, -1, -2)
        results = []
        for k, (name, attack) in enumerate(pairs):
            todo = (broken_by == -1).nonzero()[:, 0]
            bar = tqdm(total=len(todo), desc=name, unit="img", leave=False, disable=not progress)
            broken = outside = 0
            start = time.perf_counter()
            for idx in _chunks(todo, batch):
                x, y = images[idx].to(device), labels[idx].to(device)
                adv = attack(x, y)
                if not isinstance(adv, torch.Tensor) or adv.shape != x.shape:
                    what = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
                    want = tuple(x.shape)
                    raise ValueError(f"attack {name!r} must return adversarial images of shape {want}, got {what}")
                adv = adv.detach()
                inside = (_distance(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6) & (
                    adv.reshape(len(adv), -1).amin(dim=1) >= lower - 1e-6
                )
                inside &= adv.reshape(len(adv), -1).amax(dim=1) <= upper + 1e-6
                success = ((_predict(model, adv) != y) & inside).cpu()
                broken_by[idx[success]] = k
                broken += int(success.sum())
                outside += int((~inside).sum())
                bar.update(len(idx))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            bar.close()
            results.append(
                AttackResult(
                    name=name,
                    black_box=is_black_box(attack),
                    attacked=len(todo),
                    broken=broken,
                    robust_accuracy=int((broken_by == -1).sum()) / total,
                    seconds=time.perf_counter() - start,
                    out_of_budget=outside,
                )
            )
        robust = int((broken_by == -1).sum()) / total
        checks.append(_black_box_check(results, total))
        checks.append(_gradient_check(model, images, labels, batch, device, grad_threshold))
        sweep_name, sweep_acc = "", []
        if sweep_eps:
            sweep_name = _sweep_attack(preset, model, norm, sweep_eps[0], sweep_steps, seed, device)[0]
            for e in sweep_eps:
                _, attack = _sweep_attack(preset, model, norm, e, sweep_steps, seed, device)
                survive = correct.clone()
                todo = correct.nonzero()[:, 0]
                for idx in tqdm(
                    list(_chunks(todo, batch)), desc=f"sweep eps={e:.4g}", leave=False, disable=not progress
                ):
                    x, y = images[idx].to(device), labels[idx].to(device)
                    survive[idx] = (_predict(model, attack(x, y).detach()) == y).cpu()
                sweep_acc.append(int(survive.sum()) / total)
            checks.append(sweep_check(sweep_eps, sweep_acc, num_classes, total))
        else:
            checks.append(Check("eps_sweep", "skipped", "no budgets given (eps_sweep=[])"))
        checks.append(_budget_check(results))
        return Evaluation(
            norm=norm,
            eps=eps,
            n=total,
            num_classes=num_classes,
            clean_accuracy=int(correct.sum()) / total,
            attacks=results,
            robust_accuracy=robust,
            checks=checks,
            sweep_attack=sweep_name,
            sweep_eps=sweep_eps,
            sweep_accuracy=sweep_acc,
            broken_by=broken_by,
        )


def _randomness_check(model: nn.Module, x: torch.Tensor, first: torch.Tensor) -> Check:
    """Two more forward passes on the batch that gave ``first``: the logits must repeat (up to
    ``1e-4 · max(1, max|logit|)``, room for non-deterministic GPU reductions)."""
    with torch.no_grad():
        outputs = [first.float(), model(x).float(), model(x).float()]
    scale = max(1.0, float(first.float().abs().amax()))
    diff = max(float((o - first.float()).abs().amax()) for o in outputs[1:])
    flips = int(sum((o.argmax(dim=1) != first.argmax(dim=1)).sum() for o in outputs[1:]))
    values = {"images": len(x), "max_abs_logit_difference": diff, "prediction_changes": flips}
    if diff > 1e-4 * scale:
        return Check(
            "randomness",
            "warn",
            f"identical forward passes differ (max |logit difference| {diff:.3g}, {flips} predictions changed "
            f"over {len(x)} images): a randomized model (or train mode with dropout); evaluate it with "
            'expectation over transformation: AutoAttack(version="rand") or APGD(eot_iter=20)',
            values,
        )
    return Check("randomness", "pass", f"identical forward passes agree (max |difference| {diff:.2g})", values)


def _black_box_check(results: list[AttackResult], total: int) -> Check:
    """The images black-box attacks broke after every gradient attack before them had failed."""
    gradient_seen = False
    late = 0
    names = []
    for r in results:
        if r.black_box and gradient_seen:
            late += r.broken
            names.append(r.name)
        gradient_seen |= not r.black_box
    if not names:
        return Check(
            "black_box",
            "skipped",
            "no black-box attack after a gradient attack in the list (attacks='autoattack' runs Square last)",
        )
    values = {"attacks": names, "images": late, "share": late / total}
    if late:
        return Check(
            "black_box",
            "warn",
            f"{', '.join(names)} broke {late} image(s) ({late / total:.2%}) that every gradient attack failed on: "
            "the gradients do not show where the loss rises (masked or obfuscated gradients)",
            values,
        )
    return Check("black_box", "pass", f"{', '.join(names)} broke no image the gradient attacks left", values)


def _gradient_check(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device, threshold: float
) -> Check:
    """Per image, the gradient of the cross-entropy with respect to the input: exactly zero
    everywhere, or with a non-finite entry."""
    zero = nonfinite = 0
    for i in range(0, len(labels), batch):
        x = images[i : i + batch].to(device).requires_grad_(True)
        y = labels[i : i + batch].to(device)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        flat = g.reshape(len(g), -1)
        finite = torch.isfinite(flat).all(dim=1)
        nonfinite += int((~finite).sum())
        zero += int(((flat == 0).all(dim=1) & finite).sum())
    total = len(labels)
    share = (zero + nonfinite) / total
    values = {"zero": zero, "nonfinite": nonfinite, "share": share, "threshold": threshold}
    found = f"{zero} image(s) with an all-zero and {nonfinite} with a non-finite input gradient ({share:.1%})"
    if share > threshold:
        return Check(
            "zero_gradients",
            "warn",
            f"{found}, above {threshold:.1%}: gradient attacks cannot move there (flat, quantized or saturated "
            "model); use a black-box attack and losses that do not saturate (DLR)",
            values,
        )
    return Check("zero_gradients", "pass", found, values)


def _budget_check(results: list[AttackResult]) -> Check:
    outside = {r.name: r.out_of_budget for r in results if r.out_of_budget}
    if outside:
        listed = ", ".join(f"{k}: {v}" for k, v in outside.items())
        return Check(
            "budget",
            "warn",
            f"attacks returned images outside the eps-ball or the box ({listed}); they were not counted as broken",
            {"out_of_budget": outside},
        )
    return Check("budget", "pass", "every adversarial image lies in the eps-ball and the box", {})


__all__ = ["AttackResult", "Check", "Evaluation", "evaluate", "is_black_box", "sweep_check"]
