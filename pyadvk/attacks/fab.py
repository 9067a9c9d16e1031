"""FAB, the fast adaptive boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"), for L2 and L∞, untargeted and targeted.

Per image ``x0`` of class ``y`` (logits ``z``), from ``x = x0`` (then from random starts), each step:

1. Linearise at ``x``. Untargeted: every ``f_j = z_j − z_y`` (one batched Jacobian, ``j ≠ y``),
   and keep the hyperplane ``π_s`` closest in the linear model,
   ``s = argmin_j |f_j(x)| / ‖∇f_j(x)‖_q`` (``q`` dual to the attack's norm: 2 for L2, 1 for
   L∞). Targeted (``targeted=True``, AutoAttack's FAB-T): only ``f_t`` for one target ``t``, run
   once per each of the ``n_target_classes`` highest-scoring other classes of the clean image.
2. Project both the current point and the original onto ``π_s ∩ [lower, upper]^D``
   (:func:`~pyadvk.attacks.minimal.project_boundary`, exact): ``δ`` from ``x``, ``δ0`` from ``x0``.
3. Biased step, pulled toward the original by
   ``α = min(‖δ‖ / (‖δ‖ + ‖δ0‖), alpha_max)``:
   ``x ← clip((1 − α)(x + η δ) + α (x0 + η δ0))``, ``η`` a small overshoot (1.05).
4. If ``x`` is misclassified (``argmax z ≠ y``), keep it when it is the closest so far, then step
   back toward the original: ``x ← (1 − β) x0 + β x``.

Restarts after the first start from ``x0 + u`` (clipped to the box), ``u`` uniform in the
norm ball of radius ``min(eps, ‖x_best − x0‖)`` per image (where no adversarial image was
found yet and no ``eps`` is given: 5% of the box width per coordinate for L∞, the same in RMS
units for L2); the random numbers come from a generator seeded with ``seed``.

At the end of each start, a 10-step bisection on the segment from ``x0`` to that start's best image
moves it onto the boundary along that segment (a final search; its details here are ours): the
distance can only shrink, and the image stays adversarial. On a linear model the first projection
already lands on the nearest boundary (times η), so FAB is exact there up to that bisection
(2^-10 of the distance).

FAB is local: on a ReLU network the linearisation at the current point can belong to another
linear region than the boundary piece it aims at, and the iteration can settle a little above the
minimal distance. Measured on a 2-D ReLU net against exhaustive search: with 5 starts, one point
stayed 0.6% above, its minimiser 8e-4 from a kink of the class boundary with a second local minimum
of the distance on the neighbouring piece; 20 random starts reach every point (tests/test_minimal.py,
docs/minimal-attacks.md). Restarts and the targeted mode help.

Success is misclassification in both modes (the target only chooses the hyperplane). Gradients are
taken with respect to the input only; the model's train/eval mode is left as the caller set it; the
loop has no host synchronization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyadvk import _checks
from pyadvk.attacks.minimal import (
    MinimalAttack,
    MinimalResult,
    dual_norm_of,
    line_search,
    logit_difference_grad,
    logit_jacobian,
    misclassified,
    norm_of,
    other_classes,
    per_sample,
    project_boundary,
)
from pyadvk.nn.normalize import NormalizeArg

LINE_SEARCH_STEPS = 10
DEFAULT_RESTART_FRACTION = 0.05  # of the box width, for restarts where nothing bounds the radius


class FAB(MinimalAttack):
    """``FAB(model, norm="linf"|"l2", eps=None, steps=100, targeted=True, ...)``.

    ``fab.minimal(images, labels) -> MinimalResult``: the smallest adversarial perturbation found
    per image. ``fab(images, labels) -> adv_images``: the adversarial image where one with
    distance ``<= eps`` was found, the clean image elsewhere (needs ``eps``).

    Args:
        model: maps images (B, ...) in ``[lower, upper]`` to logits (B, C).
        norm: ``"linf"`` or ``"l2"``: the norm of the perturbation that is minimised.
        eps: the radius for ``__call__`` and an upper bound on the restart radius (``None``: none).
        steps: iterations per start (each: one Jacobian — C vector-Jacobian products untargeted,
            one targeted — and one forward pass).
        targeted: linearise only ``z_t − z_y`` for each of the ``n_target_classes`` top classes
            (FAB-T) instead of all logit differences at once.
        n_target_classes: how many target classes (capped at C − 1).
        restarts: starts per target (untargeted: in all); the first starts at the image.
        alpha_max: the largest pull ``α`` toward the original in one step, in [0, 1].
        eta: overshoot of the projection step (>= 1).
        beta: backward step after a success, ``x ← (1 − β) x0 + β x``, in (0, 1].
        seed: seed of the random restarts.
        lower, upper: the valid input range.
        normalize: ``(mean, std)`` for a model that expects normalized inputs (distances in pixel space).
        autocast: run the model's forward and backward under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``; ``None``: full precision); the linearisation,
            projection and step stay in the images' dtype.
        channels_last: feed the model 4-D images in channels_last memory format.
        backend: force a body of the boundary projection ("cuda", "triton", "cpp", "torch";
            :func:`pyadvk.ops.boundary_projection`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float | None = None,
        steps: int = 100,
        targeted: bool = True,
        n_target_classes: int = 9,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
        lower: float = 0.0,
        upper: float = 1.0,
        normalize: NormalizeArg = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            model,
            norm=norm,
            eps=eps,
            lower=lower,
            upper=upper,
            normalize=normalize,
            autocast=autocast,
            channels_last=channels_last,
            backend=backend,
        )
        self.steps = _checks.integer("steps", steps, low=1)
        self.targeted = bool(targeted)
        self.n_target_classes = _checks.integer("n_target_classes", n_target_classes, low=1)
        self.restarts = _checks.integer("restarts", restarts, low=1)
        self.alpha_max = _checks.real("alpha_max", alpha_max, low=0.0)
        if self.alpha_max > 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        self.eta = _checks.real("eta", eta, low=1.0)
        self.beta = _checks.real("beta", beta, low=0.0, low_inclusive=False)
        if self.beta > 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.seed = _checks.integer("seed", seed)

    def _minimal(self, images: torch.Tensor, labels: torch.Tensor) -> MinimalResult:
        """The smallest adversarial perturbation FAB finds per image (see the module docstring).

        Args:
            images: (B, ...) in ``[lower, upper]``; labels: (B,) int class indices.
        """
        x0, labels, logits = self.start(images, labels)
        batch = x0.shape[0]
        found = logits.argmax(dim=1) != labels  # already misclassified: distance 0
        best = x0.clone()
        best_dist = torch.where(found, 0.0, torch.inf).to(x0.dtype)
        if batch == 0:
            return self.result(x0, best, found)
        generator = torch.Generator(device=x0.device).manual_seed(self.seed)
        runs: list[tuple[torch.Tensor, int]]  # (the classes whose boundaries to linearise (B, K), restart)
        if self.targeted:
            count = min(self.n_target_classes, logits.shape[1] - 1)
            others = logits.float().scatter(1, labels[:, None], -torch.inf)
            targets = others.topk(count, dim=1).indices  # (B, count), best first
            runs = [(targets[:, j : j + 1], r) for j in range(count) for r in range(self.restarts)]
        else:
            runs = [(other_classes(labels, logits.shape[1]), r) for r in range(self.restarts)]
        for classes, restart in runs:
            start = x0 if restart == 0 else self._random_start(x0, best_dist, generator)
            image, dist = self._run(x0, labels, start, classes)
            better = dist < best_dist
            best = torch.where(per_sample(better, x0), image, best)
            best_dist = torch.where(better, dist, best_dist)
        return self.result(x0, best, torch.isfinite(best_dist))

    def _random_start(self, x0: torch.Tensor, best_dist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x0 + u`` clipped to the box, ``u`` uniform in the ball of radius
        ``min(eps, best)`` (or the default fraction of the box width where both are inf)."""
        dims = x0[0].numel()
        width = DEFAULT_RESTART_FRACTION * (self.upper - self.lower)
        default = width if self.norm == "linf" else width * math.sqrt(dims)
        radius = best_dist.clone()
        if self.eps is not None:
            radius = radius.clamp_max(self.eps)
        radius = torch.where(torch.isfinite(radius), radius, default)
        if self.norm == "linf":
            u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1
        else:
            u = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            u = u / per_sample(norm_of(u, "l2").clamp_min(1e-12), u)
            shrink = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
            u = u * per_sample(shrink ** (1.0 / dims), u)
        return (x0 + per_sample(radius, x0) * u).clamp(self.lower, self.upper)

    def _boundary(
        self, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The linearised boundary ``f + w·(z − x) = 0`` to project on, ``f`` (B,) and ``w`` (B, D):
        of ``f_k = z_k − z_y`` for the one class in ``classes`` (B, 1) (targeted), else the closest
        of those for every class in ``classes`` (B, K), from one batched Jacobian of K rows."""
        if classes.shape[1] == 1:
            _, f, w = logit_difference_grad(self.run_model, x, labels, classes[:, 0])
            return f, w
        logits, normals = logit_jacobian(self.run_model, x, classes, relative_to=labels)  # (B, C), (B, K, D)
        rows = torch.arange(x.shape[0], device=x.device)
        diffs = logits.gather(1, classes) - logits.gather(1, labels[:, None])
        dist = diffs.abs() / dual_norm_of(normals, self.norm).clamp_min(1e-12)
        closest = dist.argmin(dim=1)
        return diffs[rows, closest], normals[rows, closest]

    def _run(
        self, x0: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` FAB iterations from ``start``, then the bisection toward ``x0``: the closest
        adversarial image of this run and its distance (``x0`` and ``inf`` where none was found)."""
        batch = x0.shape[0]
        flat0 = x0.reshape(batch, -1)
        best = x0.clone()
        best_dist = torch.full((batch,), torch.inf, device=x0.device, dtype=x0.dtype)
        x = start.clone()
        for _ in range(self.steps):
            f, w = self._boundary(x, labels, classes)
            flat = x.reshape(batch, -1)
            offset = f - (w * flat).sum(dim=1)  # the hyperplane w·z + offset = 0
            deltas = project_boundary(
                torch.cat([flat, flat0]),
                torch.cat([w, w]),
                torch.cat([offset, offset]),
                self.lower,
                self.upper,
                self.norm,
                backend=self.backend,
            )
            delta, delta0 = deltas[:batch], deltas[batch:]
            size, size0 = norm_of(delta, self.norm), norm_of(delta0, self.norm)
            alpha = (size / (size + size0).clamp_min(1e-12)).clamp_max(self.alpha_max)[:, None]
            moved = (1 - alpha) * (flat + self.eta * delta) + alpha * (flat0 + self.eta * delta0)
            x = moved.clamp(self.lower, self.upper).view_as(x0)
            fooled = misclassified(self.run_model, x, labels)
            dist = norm_of(x - x0, self.norm)
            better = fooled & (dist < best_dist)
            best = torch.where(per_sample(better, x0), x, best)
            best_dist = torch.where(better, dist, best_dist)
            x = torch.where(per_sample(fooled, x0), (1 - self.beta) * x0 + self.beta * x, x)
        found = torch.isfinite(best_dist)
        best = torch.where(per_sample(found, x0), line_search(self.run_model, x0, best, labels, LINE_SEARCH_STEPS), x0)
        return best, torch.where(found, norm_of(best - x0, self.norm), torch.inf)
