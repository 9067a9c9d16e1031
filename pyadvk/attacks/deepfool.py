"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard 2016, "DeepFool: a simple and accurate method to
fool deep neural networks"), multi-class, for L2 and L∞, inside the input box.

Per image ``x0`` of class ``y``, with ``r = 0`` and ``x = x0``, until ``x`` is misclassified or
``steps`` iterations have run:

1. Linearise every ``f_k = z_k − z_y`` at ``x`` for the candidate classes ``k`` (all, or the
   ``n_classes − 1`` highest-scoring others of the clean image) and pick the closest linearised
   boundary ``l = argmin_k |f_k(x)| / ‖∇f_k(x)‖_q`` (``q`` dual to the norm: 2 for L2, 1 for L∞).
2. Step onto it: ``r ← r + δ``, with ``δ`` the smallest step from ``x`` to that hyperplane.
   The paper's step is ``|f_l| / ‖w_l‖₂² · w_l`` (L2) and ``|f_l| / ‖w_l‖₁ · sign(w_l)`` (L∞);
   here it is the exact projection onto the hyperplane intersected with the box
   (:func:`~pyadvk.attacks.minimal.project_boundary`), which equals the paper's step whenever the
   box is not in the way.
3. ``x = clip(x0 + (1 + overshoot)·r)`` (the overshoot pushes the point across the boundary).

Each image stops at its first misclassified ``x``. Then (our addition) a 10-step bisection on the
segment from ``x0`` to that image removes most of the overshoot: the distance can only shrink and
the image stays adversarial. On a linear model the first step lands on the nearest boundary, so
DeepFool is exact there up to that bisection (2^-10 of the distance).

The loop reads one flag per iteration on the host (whether any image is still running) to stop
early: DeepFool usually needs only a few iterations. Gradients are taken with respect to the input
only; the model's train/eval mode is left as the caller set it.
"""

from __future__ import annotations

import torch
from torch import nn

from pyadvk import _checks
from pyadvk.attacks.minimal import (
    MinimalAttack,
    MinimalResult,
    dual_norm_of,
    line_search,
    logit_jacobian,
    per_sample,
    project_boundary,
)
from pyadvk.nn.normalize import NormalizeArg

LINE_SEARCH_STEPS = 10


class DeepFool(MinimalAttack):
    """``DeepFool(model, norm="l2"|"linf", steps=50, overshoot=0.02, n_classes=None)``.

    ``deepfool.minimal(images, labels) -> MinimalResult``: the adversarial image found per image.
    ``deepfool(images, labels) -> adv_images``: the adversarial image where one with distance
    ``<= eps`` was found, the clean image elsewhere (needs ``eps``).

    Args:
        model: maps images (B, ...) in ``[lower, upper]`` to logits (B, C).
        norm: ``"l2"`` or ``"linf"``.
        steps: the most iterations (each: one Jacobian of the candidate logits).
        overshoot: the factor ``1 + overshoot`` on the accumulated step (>= 0).
        n_classes: how many classes to consider, the true one included, by clean logits
            (``None``: all; capped at C; at least 2).
        eps: the radius for ``__call__`` (``None``: only ``.minimal`` may be called).
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
        norm: str = "l2",
        steps: int = 50,
        overshoot: float = 0.02,
        n_classes: int | None = None,
        eps: float | None = None,
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
        self.overshoot = _checks.real("overshoot", overshoot, low=0.0)
        self.n_classes = None if n_classes is None else _checks.integer("n_classes", n_classes, low=2)

    def _minimal(self, images: torch.Tensor, labels: torch.Tensor) -> MinimalResult:
        """The adversarial image DeepFool reaches per image (see the module docstring).

        Args:
            images: (B, ...) in ``[lower, upper]``; labels: (B,) int class indices.
        """
        x0, labels, logits = self.start(images, labels)
        batch = x0.shape[0]
        found = logits.argmax(dim=1) != labels
        best = x0.clone()
        if batch == 0:
            return self.result(x0, best, found)
        count = logits.shape[1] if self.n_classes is None else min(self.n_classes, logits.shape[1])
        others = logits.float().scatter(1, labels[:, None], -torch.inf).topk(count - 1, dim=1).indices
        classes = torch.cat([labels[:, None], others], dim=1)  # (B, K): the true class first
        rows = torch.arange(batch, device=x0.device)
        flat0 = x0.reshape(batch, -1)
        total = torch.zeros_like(flat0)
        x = x0
        running = ~found
        for _ in range(self.steps):
            if not bool(running.any()):
                break
            # the K − 1 rows ∇(z_k − z_y), (B, K − 1, D), one vector-Jacobian product each
            logits, normals = logit_jacobian(self.run_model, x, classes[:, 1:], relative_to=labels)
            fooled = logits.argmax(dim=1) != labels
            newly = running & fooled
            best = torch.where(per_sample(newly, x0), x, best)
            found = found | newly
            running = running & ~fooled
            picked = logits.gather(1, classes)
            diffs = picked[:, 1:] - picked[:, :1]  # f_k = z_k − z_y, (B, K − 1)
            dist = diffs.abs() / dual_norm_of(normals, self.norm).clamp_min(1e-12)
            closest = dist.argmin(dim=1)
            f, w = diffs[rows, closest], normals[rows, closest]
            flat = x.reshape(batch, -1)
            delta = project_boundary(
                flat, w, f - (w * flat).sum(dim=1), self.lower, self.upper, self.norm, backend=self.backend
            )
            total = torch.where(running[:, None], total + delta, total)
            x = (flat0 + (1 + self.overshoot) * total).clamp(self.lower, self.upper).view_as(x0)
        else:
            with torch.no_grad():
                fooled = self.run_model(x).argmax(dim=1) != labels
            newly = running & fooled
            best = torch.where(per_sample(newly, x0), x, best)
            found = found | newly
        searched = line_search(self.run_model, x0, best, labels, LINE_SEARCH_STEPS)
        best = torch.where(per_sample(found, x0), searched, best)
        return self.result(x0, best, found)
