"""APGD and APGD-T (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Algorithm 1 and Section 3) on the fused APGD step.

For each image, with the objective f (cross-entropy, DLR or targeted DLR) to maximize over the
eps-ball around the clean image x (intersected with the box [lower, upper]) and ``P`` the
projection onto that set:

* ``x^(0)``: a uniform random point of the ball (clipped to the box), ``eta = 2 eps``;
* ``x^(1) = P(x^(0) + eta step(∇f(x^(0))))`` (no momentum), then for k >= 1
  ``z = P(x^(k) + eta step(∇f(x^(k))))``, ``x^(k+1) = P(x^(k) + 0.75 (z - x^(k)) + 0.25 (x^(k) - x^(k-1)))``
  (``step`` = sign for L∞, g / ||g||_2 for L2): one call of :func:`pyadvk.ops.apgd_step_`;
* checkpoints ``w_j = ceil(p_j steps)``, ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (:func:`checkpoints`). Once ``x^(w_j)`` is
  evaluated, eta is halved and ``x^(w_j)`` replaced by the best point so far ``x_max`` (with its
  objective and gradient) where (1) ``f(x^(i+1)) > f(x^(i))`` held for fewer than
  ``rho (w_j - w_{j-1})`` of the ``i = w_{j-1} .. w_j - 1``, or (2) eta was not halved at
  ``w_{j-1}`` and ``f_max`` did not grow since then (``f_max`` at ``w_0`` is ``f(x^(0))``);
* the result is, per image, the last iterate that was misclassified if any was (success is "the
  model misclassified some iterate", as in the reference evaluation), else ``x_max``.

The schedule, checkpoints and best-point bookkeeping are tensor ops on the images' device (no host
synchronization inside a run), so one iteration can be captured as a CUDA graph
(``cuda_graph=True``). The host synchronizes only for the input checks at the start of a call and
once per restart (APGD) or per target class and restart (APGD-T) to pick the images still standing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from pyadvk import _checks
from pyadvk._backend import get_backend
from pyadvk.attacks import _graphs
from pyadvk.attacks.pgd import Attack
from pyadvk.nn.normalize import NormalizeArg
from pyadvk.ops import apgd_step_, random_init

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75
GRAPH_WARMUP = 3  # eager iterations of a run before the captured ones (the first has no momentum)


def _check_dlr(name: str, logits, min_classes: int, **indices) -> None:
    _checks.tensor("logits", logits, min_dim=2)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, C), got {tuple(logits.shape)}")
    if logits.shape[1] < min_classes:
        raise ValueError(
            f"{name} needs logits with at least {min_classes} classes (it divides by a gap between sorted "
            f"logits), got shape {tuple(logits.shape)}"
        )
    for arg, t in indices.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{arg} must be an int64 tensor of class indices, got {what}")
        if t.shape != logits.shape[:1]:
            raise ValueError(
                f"{arg} must have shape ({logits.shape[0]},) (one per row of logits), got {tuple(t.shape)}"
            )


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio, per row: ``-(z_y - max_{i != y} z_i) / (z_π1 - z_π3 + 1e-12)``.

    Args:
        logits: (B, C) with C >= 3; labels: (B,) class indices y.

    Returns:
        (B,) float32 (computed in float32 whatever the logits' dtype). π sorts each row's logits in
        decreasing order. It is > 0 exactly where the row is misclassified, and it does not change
        when the logits are shifted or scaled.
    """
    _check_dlr("dlr_loss", logits, 3, labels=labels)
    z = logits.float()
    top = z.topk(3, dim=1).values
    index = labels.long()[:, None]
    z_y = z.gather(1, index).squeeze(1)
    z_other = z.scatter(1, index, float("-inf")).amax(dim=1)
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted difference of logits ratio, per row: ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12)``.

    Args:
        logits: (B, C) with C >= 4; labels: (B,) true classes y; targets: (B,) target classes t.

    Returns:
        (B,) float32; > 0 exactly where ``z_t > z_y`` (then the row is misclassified).
    """
    _check_dlr("dlr_loss_targeted", logits, 4, labels=labels, targets=targets)
    z = logits.float()
    top = z.topk(4, dim=1).values
    z_y = z.gather(1, labels.long()[:, None]).squeeze(1)
    z_t = z.gather(1, targets.long()[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The checkpoints ``w_j = ceil(p_j * steps)`` for ``p_j <= 1``, increasing, without repeats.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in exact
    rational arithmetic (so 0.41 * 100 is 41, not 42). ``checkpoints(100)`` is
    ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    steps = _checks.integer("steps", steps, low=1)
    p_prev, p = Fraction(0), Fraction(22, 100)
    ps = [p_prev]
    while p <= 1:
        ps.append(p)
        p_prev, p = p, p + max(p - p_prev - Fraction(3, 100), Fraction(6, 100))
    return sorted({math.ceil(q * steps) for q in ps})


def _view(mask: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return mask.view((-1,) + (1,) * (ref.dim() - 1))


class _Run:
    """The state of one APGD run on a batch; every tensor is updated in place (so that a captured
    iteration reads and writes the same memory on each replay), except that ``cur``/``prev`` swap."""

    def __init__(self, start: torch.Tensor, eps: torch.Tensor) -> None:
        batch, device = start.shape[0], start.device
        self.cur = start
        self.prev = start.clone()  # read with weight 0 by the first step: must be finite
        self.grad = torch.zeros_like(start)
        self.x_best = start.clone()
        self.grad_best = torch.zeros_like(start)
        self.x_found = start.clone()
        self.loss_cur = torch.full((batch,), math.inf, device=device)
        self.loss_best = torch.full((batch,), -math.inf, device=device)
        self.best_last = torch.full((batch,), -math.inf, device=device)
        self.count = torch.zeros(batch, device=device)
        self.eta = 2.0 * eps
        self.reduced_last = torch.zeros(batch, device=device, dtype=torch.bool)
        self.found = torch.zeros(batch, device=device, dtype=torch.bool)

    def swap(self) -> None:
        self.cur, self.prev = self.prev, self.cur

    def reset(self, start: torch.Tensor, eps: torch.Tensor) -> None:
        """The state ``_Run(start, eps)`` has, written into this run's tensors (which captured
        iterations read); ``cur`` and ``prev`` must be the tensors they were at construction."""
        for t in (self.cur, self.prev, self.x_best, self.x_found):
            t.copy_(start)
        for t in (self.grad, self.grad_best, self.count, self.reduced_last, self.found):
            t.zero_()
        self.loss_cur.fill_(math.inf)
        self.loss_best.fill_(-math.inf)
        self.best_last.fill_(-math.inf)
        torch.mul(eps, 2.0, out=self.eta)

    def record(self, loss: torch.Tensor, wrong: torch.Tensor, grad: torch.Tensor) -> None:
        """Bookkeeping for the newly evaluated point ``cur`` with objective ``loss`` and gradient ``grad``."""
        self.count.add_(loss > self.loss_cur)
        self.loss_cur.copy_(loss)
        improved = loss > self.loss_best
        torch.where(_view(improved, self.cur), self.cur, self.x_best, out=self.x_best)
        torch.where(_view(improved, grad), grad, self.grad_best, out=self.grad_best)
        torch.where(improved, loss, self.loss_best, out=self.loss_best)
        self.grad.copy_(grad)
        torch.where(_view(wrong, self.cur), self.cur, self.x_found, out=self.x_found)
        self.found.logical_or_(wrong)

    def checkpoint(self, window: int, rho: float) -> None:
        """Halves eta and restarts from the best point where the objective stalled (module docstring)."""
        stalled = (self.count < rho * window) | (~self.reduced_last & (self.loss_best <= self.best_last))
        self.reduced_last.copy_(stalled)
        self.best_last.copy_(self.loss_best)
        torch.where(stalled, self.eta * 0.5, self.eta, out=self.eta)
        torch.where(_view(stalled, self.cur), self.x_best, self.cur, out=self.cur)
        torch.where(_view(stalled, self.grad), self.grad_best, self.grad, out=self.grad)
        torch.where(stalled, self.loss_best, self.loss_cur, out=self.loss_cur)
        self.count.zero_()

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.where(_view(self.found, self.cur), self.x_found, self.x_best), self.found, self.loss_best


class _CapturedRun:
    """The static tensors of captured APGD iterations: a run's state and copies of its inputs,
    and the two graphs (set after capture)."""

    def __init__(self, start, x_orig, labels, targets, eps) -> None:
        self.x_orig, self.labels, self.eps = x_orig.clone(), labels.clone(), eps.clone()
        self.targets = None if targets is None else targets.clone()
        self.run = _Run(start.clone(), self.eps)
        self.buffers = (self.run.cur, self.run.prev)
        self.graphs: tuple = ()

    def load(self, start, x_orig, labels, targets, eps) -> None:
        """Copies a new run's inputs (same key) in and resets the run's state."""
        for static, new in ((self.x_orig, x_orig), (self.labels, labels), (self.targets, targets), (self.eps, eps)):
            if static is not None:
                static.copy_(new)
        self.run.cur, self.run.prev = self.buffers
        self.run.reset(start, self.eps)


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020), untargeted, with the cross-entropy or the DLR loss.

    ``APGD(model, norm="linf", eps=8/255)(images, labels) -> adv_images``; the algorithm is the
    module docstring's, on images (B, ...) in [lower, upper] with labels (B,).

    Args:
        model: maps images (B, ...) to logits (B, C). Its train/eval mode is left as set, and no
            parameter ``.grad`` is touched (gradients are taken with respect to the input only).
        norm: "linf" or "l2".
        eps: radius of the ball (>= 0), a float or a per-image (B,) tensor.
        steps: iterations per run (>= 1); each run evaluates the model ``steps + 1`` times.
        restarts: runs per image (>= 1); each further run starts from a new random point and
            attacks only the images every earlier run failed on.
        loss: "ce" (cross-entropy) or "dlr" (:func:`dlr_loss`, needs >= 3 classes).
        rho: condition (1)'s fraction of increasing steps, in (0, 1).
        seed: seeds the random starts (a ``torch.Generator`` on the images' device), so the same
            seed, model and images give the same result.
        eot_iter: forward/backward passes averaged per evaluation (objective, gradient and the
            logits whose argmax decides success), for randomized models (>= 1).
        lower, upper: the valid input range.
        backend: force a body of the fused step ("cuda", "triton", "cpp", "torch").
        autocast, channels_last, normalize: as in :class:`pyadvk.attacks.pgd.Attack`.
        cuda_graph: capture one iteration (step, forward, input-gradient backward, bookkeeping)
            as a CUDA graph on the images' device after three eager iterations and replay it (two
            graphs: the current and previous points alternate between two buffers); checkpoints
            run eagerly between replays. The graphs are kept per (batch shape, dtype, layout,
            device, model, settings) and replayed by later runs without a new capture, until
            :meth:`release_graphs` or the attack is deleted (:mod:`pyadvk.attacks._graphs`).
            Needs CUDA images and a model without host synchronization in its forward.

    Images the model misclassifies unperturbed are returned unchanged. Others are returned as
    the last misclassified iterate of a run that found one, else the highest-objective point
    over all runs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float | torch.Tensor,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        seed: int = 0,
        eot_iter: int = 1,
        lower: float = 0.0,
        upper: float = 1.0,
        backend: str | None = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        normalize: NormalizeArg = None,
    ) -> None:
        super().__init__(
            model,
            eps=eps,
            norm=norm,
            lower=lower,
            upper=upper,
            backend=backend,
            autocast=autocast,
            channels_last=channels_last,
            normalize=normalize,
        )
        self.loss_name = _checks.choice("loss", loss, LOSSES)
        self.loss = dlr_loss if self.loss_name == "dlr" else _cross_entropy
        self.steps = _checks.integer("steps", steps, low=1)
        self.restarts = _checks.integer("restarts", restarts, low=1)
        self.rho = _checks.real("rho", rho)
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho must be in (0, 1), got {self.rho}")
        self.seed = _checks.integer("seed", seed, low=0)
        self.eot_iter = _checks.integer("eot_iter", eot_iter, low=1)
        self.cuda_graph = bool(cuda_graph)
        self._graphs = _graphs.GraphCache()

    # -- what a subclass changes ------------------------------------------------------------------

    def _check_classes(self, n_classes: int) -> None:
        if self.loss_name == "dlr" and n_classes < 3:
            raise ValueError(
                f"loss='dlr' needs at least 3 classes (it divides by z_pi1 - z_pi3), got logits with {n_classes}"
            )

    def _target_rounds(self, logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """The target classes of each round of runs (None: untargeted)."""
        return [None]

    def _objective(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The objective to maximize, per image (B,): the loss, or the targeted DLR loss towards ``targets``."""
        if targets is not None:
            return dlr_loss_targeted(logits, labels, targets)
        return self.loss(logits, labels)

    # -- the attack --------------------------------------------------------------------------------

    @property
    def _format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _amp(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with self._amp(x.device):
            return self.model(x).float()

    def _pass(self, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None):
        with torch.enable_grad():
            logits = self._logits(x)
            loss = self._objective(logits, labels, targets)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), logits.detach(), grad

    def _evaluate(self, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None):
        """Objective (B,), misclassified (B,) and input gradient at ``x``, averaged over eot_iter passes."""
        x = x.detach().requires_grad_(True)
        loss, logits, grad = self._pass(x, labels, targets)
        for _ in range(self.eot_iter - 1):
            more = self._pass(x, labels, targets)
            loss, logits, grad = loss + more[0], logits + more[1], grad + more[2]
        if self.eot_iter > 1:
            loss, logits, grad = loss / self.eot_iter, logits / self.eot_iter, grad / self.eot_iter
        return loss, logits.argmax(dim=1) != labels, grad

    def _iteration(self, run: _Run, x_orig, labels, targets, eps, momentum: float) -> None:
        apgd_step_(
            run.cur,
            run.prev,
            x_orig,
            run.grad,
            eta=run.eta,
            eps=eps,
            momentum=momentum,
            norm=self.norm,
            lower=self.lower,
            upper=self.upper,
            backend=self.backend,
            check_values=False,
        )
        run.swap()
        run.record(*self._evaluate(run.cur, labels, targets))

    def _run(self, x_orig, labels, targets, eps, generator):
        """One APGD run on a batch: (result points, found (B,), best objective (B,))."""
        # drawn in the contiguous layout, so that channels_last does not change the start
        start = random_init(
            x_orig.contiguous(),
            eps=eps,
            norm=self.norm,
            lower=self.lower,
            upper=self.upper,
            generator=generator,
            backend=self.backend,
            check_values=False,
        ).contiguous(memory_format=self._format)
        marks = checkpoints(self.steps)
        windows = {w: w - w_prev for w_prev, w in zip(marks, marks[1:]) if w < self.steps}
        if self.cuda_graph and self.steps > GRAPH_WARMUP:
            return self._graphed_run(start, x_orig, labels, targets, eps, windows)
        run = _Run(start, eps)
        self._begin(run, labels, targets)
        for k in range(self.steps):
            self._iterate(run, k, x_orig, labels, targets, eps, windows)
        return run.result()

    def _begin(self, run: _Run, labels, targets) -> None:
        """Evaluates the starting point."""
        run.record(*self._evaluate(run.cur, labels, targets))
        run.best_last.copy_(run.loss_best)

    def _iterate(self, run: _Run, k: int, x_orig, labels, targets, eps, windows: dict[int, int]) -> None:
        """Iteration k (the first without momentum), then the checkpoint that follows it, if any."""
        self._iteration(run, x_orig, labels, targets, eps, 1.0 if k == 0 else MOMENTUM)
        if k + 1 in windows:
            run.checkpoint(windows[k + 1], self.rho)

    def release_graphs(self) -> None:
        """Frees the CUDA graphs (and their memory pools) that ``cuda_graph=True`` keeps between
        runs; the next run captures again. Deleting the attack frees them too."""
        self._graphs.clear()

    def _graph_key(self, x_orig: torch.Tensor, targets, eps: torch.Tensor) -> Hashable:
        """What the captured iterations depend on besides the values copied in before a run."""
        settings = (self.norm, self.loss_name, id(self.loss), self.eot_iter, self.lower, self.upper)
        return (
            _graphs.tensor_key(x_orig),
            _graphs.tensor_key(eps),
            targets is None,
            settings + (self.autocast, self.backend, get_backend()),
            _graphs.model_key(self.model),
        )

    def _graphed_run(self, start, x_orig, labels, targets, eps, windows: dict[int, int]):
        """:meth:`_run` with one iteration captured as CUDA graphs on the images' device (two:
        the current and previous points alternate between two buffers) and replayed, the
        checkpoints eager between replays. The graphs are kept per key (:meth:`_graph_key`): a
        later run with the same key copies its inputs into their tensors, runs the start and the
        GRAPH_WARMUP eager iterations, and replays the rest without capturing."""
        key = self._graph_key(x_orig, targets, eps)
        entry = self._graphs.get(key)
        fresh = entry is None
        with _graphs.on_device(x_orig.device):
            if entry is None:
                entry = _CapturedRun(start, x_orig, labels, targets, eps)
            else:
                entry.load(start, x_orig, labels, targets, eps)
            run, args = entry.run, (entry.x_orig, entry.labels, entry.targets, entry.eps)

            def warmup() -> None:
                self._begin(run, entry.labels, entry.targets)
                for k in range(GRAPH_WARMUP):
                    self._iterate(run, k, *args, windows)

            def iteration() -> None:  # the swap back leaves the Python references as they were
                self._iteration(run, *args, MOMENTUM)
                run.swap()

            if fresh:
                # capturing runs no kernel: graph 0 reads cur = A and writes B, graph 1 the reverse
                first = _graphs.capture(x_orig.device, iteration, warmup=warmup)
                run.swap()
                second = _graphs.capture(x_orig.device, iteration, pool=first.pool())
                run.swap()
                entry.graphs = (first, second)
                self._graphs.put(key, entry)
            else:
                warmup()
            for k in range(GRAPH_WARMUP, self.steps):
                entry.graphs[(k - GRAPH_WARMUP) % 2].replay()
                run.swap()
                if k + 1 in windows:
                    run.checkpoint(windows[k + 1], self.rho)
            x, found, loss = run.result()
            return x, found.clone(), loss.clone()  # the static tensors are the next run's

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.cuda_graph:
            _graphs.check_device(images)
        images, labels = images.detach(), labels.long()
        fmt = self._format
        images = images.contiguous(memory_format=fmt)
        adv = images.clone()
        batch = images.shape[0]
        if images.numel() == 0:
            return adv
        eps, eps_t = _checks.per_sample("eps", self.eps, batch, images.device)
        if eps_t is None:
            eps_t = torch.full((batch,), eps, device=images.device, dtype=torch.float32)
        with torch.no_grad():
            logits = self._logits(images)
            for _ in range(self.eot_iter - 1):
                logits += self._logits(images)
            logits /= self.eot_iter
        self.check_logits(logits, labels)
        self._check_classes(logits.shape[1])
        todo = logits.argmax(dim=1) == labels
        best = torch.full((batch,), -math.inf, device=images.device)
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        for targets in self._target_rounds(logits, labels):
            for _ in range(self.restarts):
                idx = todo.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return adv
                x_orig = images[idx].contiguous(memory_format=fmt)
                sub_targets = None if targets is None else targets[idx]
                x, found, loss = self._run(x_orig, labels[idx], sub_targets, eps_t[idx], generator)
                keep = found | (loss > best[idx])
                adv[idx] = torch.where(_view(keep, x), x, adv[idx])
                best[idx] = torch.where(found, math.inf, torch.maximum(loss, best[idx]))
                todo[idx] = ~found
        return adv


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


class APGDT(APGD):
    """Targeted APGD with the targeted DLR loss (Croce & Hein 2020, "APGD-T").

    For the i-th of the ``n_target_classes`` classes other than the true one with the highest
    clean logits (the second-highest class first), one round of ``restarts`` APGD runs maximizes
    :func:`dlr_loss_targeted` towards it, on the images no earlier run has broken. Success is
    misclassification (as for :class:`APGD`). Needs ``n_target_classes < C`` and C >= 4 classes.
    The other arguments are :class:`APGD`'s.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float | torch.Tensor,
        steps: int = 100,
        n_target_classes: int = 9,
        restarts: int = 1,
        rho: float = 0.75,
        seed: int = 0,
        eot_iter: int = 1,
        lower: float = 0.0,
        upper: float = 1.0,
        backend: str | None = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        normalize: NormalizeArg = None,
    ) -> None:
        super().__init__(
            model,
            norm=norm,
            eps=eps,
            steps=steps,
            restarts=restarts,
            loss="dlr",
            rho=rho,
            seed=seed,
            eot_iter=eot_iter,
            lower=lower,
            upper=upper,
            backend=backend,
            autocast=autocast,
            channels_last=channels_last,
            cuda_graph=cuda_graph,
            normalize=normalize,
        )
        self.loss_name = "dlr-targeted"
        self.n_target_classes = _checks.integer("n_target_classes", n_target_classes, low=1)

    def _check_classes(self, n_classes: int) -> None:
        if n_classes < 4:
            raise ValueError(
                f"APGDT needs at least 4 classes (the targeted DLR loss divides by z_pi1 - (z_pi3 + z_pi4) / 2), "
                f"got logits with {n_classes}"
            )
        if self.n_target_classes >= n_classes:
            raise ValueError(
                f"n_target_classes must be < the number of classes ({n_classes}): there are {n_classes - 1} "
                f"classes other than the true one; got {self.n_target_classes}"
            )

    def _target_rounds(self, logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor | None]:
        others = logits.scatter(1, labels.long()[:, None], float("-inf"))
        order = others.argsort(dim=1, descending=True)
        return [order[:, i] for i in range(self.n_target_classes)]
