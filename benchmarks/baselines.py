"""Re-implementations of what the peer libraries run, for the benchmarks and the tests (one place;
not part of the installed package).

These are the unfused op chains of torchattacks (v3.5) written out with plain torch ops, and its
attack loops, so pyadvk can be checked against them and timed against them without depending on
torchattacks. They are baselines, not pyadvk's definitions (those are the ``*_reference`` bodies
in :mod:`pyadvk.ops`).
"""

from __future__ import annotations

import torch
from torch import nn


def torchattacks_linf_step(adv, images, grad, eps, alpha, lower=0.0, upper=1.0):
    """torchattacks PGD's update: step, project ``delta`` onto [-eps, eps], clip (5 ops)."""
    adv = adv + alpha * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=lower, max=upper)


def torchattacks_l2_step(adv, images, grad, eps, alpha, lower=0.0, upper=1.0):
    """torchattacks PGDL2's update (12 ops): normalized step, rescale delta into the ball, clip."""
    batch = adv.shape[0]
    view = (batch,) + (1,) * (adv.dim() - 1)
    grad_norms = torch.norm(grad.reshape(batch, -1), p=2, dim=1) + 1e-10
    adv = adv + alpha * (grad / grad_norms.view(view))
    delta = adv - images
    delta_norms = torch.norm(delta.reshape(batch, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    return torch.clamp(images + delta * factor.view(view), min=lower, max=upper)


def torchattacks_pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    targeted: bool = False,
    decay: float = 0.0,
) -> torch.Tensor:
    """torchattacks' PGD / PGDL2 loop without random start (MIFGSM's when ``decay > 0``):
    mean cross-entropy, ``autograd.grad`` on a fresh leaf each step."""
    loss = nn.CrossEntropyLoss()
    step = torchattacks_linf_step if norm == "linf" else torchattacks_l2_step
    images = images.clone().detach()
    adv = images.clone().detach()
    momentum = torch.zeros_like(images)
    for _ in range(steps):
        adv.requires_grad = True
        outputs = model(adv)
        cost = -loss(outputs, labels) if targeted else loss(outputs, labels)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        if decay > 0:
            dims = tuple(range(1, grad.dim()))
            grad = grad / torch.mean(torch.abs(grad), dim=dims, keepdim=True)
            grad = grad + momentum * decay
            momentum = grad
        adv = step(adv.detach(), images, grad, eps, alpha).detach()
    return adv
