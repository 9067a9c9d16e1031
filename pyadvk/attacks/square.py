"""Square Attack (Andriushchenko, Croce, Flammarion and Hein 2020, "Square Attack: a query-efficient
black-box adversarial attack via random search"): a score-based attack that never reads a gradient.

Random search on the perturbation ``δ = x̂ − x``: each iteration proposes a change of ``δ`` on a
random square window (side ``s ≈ sqrt(p · H · W)``, the same for every image of the iteration,
positions drawn per image), queries the model once per image still standing, and keeps the
proposal where it lowers the loss (the margin ``z_y − max_{k≠y} z_k``, or ``log softmax(z)_y``
for ``loss="ce"``). An image is broken once its margin is negative; it is not queried again.

The share of pixels ``p`` starts at ``p_init`` and is halved after the iterations
{10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000} of the paper's schedule, which is stated for
10,000 queries; here iteration ``i`` of ``n_queries`` is at ``i · 10000 / n_queries`` of it.

* L∞ (the paper's Algorithm 2): the initialization is vertical stripes, ``δ[c, :, j] = ±ε`` with
  an independent sign per channel and column; an update sets the window of each channel to
  ``±ε`` (one sign per channel), i.e. to a vertex of the ball. A proposal that would leave the
  (clipped) image unchanged has the sign of its first channel flipped, so no query is wasted.
* L2 (Algorithm 3): the initialization tiles the image with a grid of ``⌊H/5⌋``-sided squares
  (5×5 tiles, the rest of the border zero), each holding the centred pattern ``η`` with a random
  sign per channel, rescaled to ``‖δ‖₂ = ε``. An update draws two windows ``W₁, W₂``; per channel
  ``i`` it moves the mass of ``W₁ ∪ W₂`` (plus an even share of the unused budget
  ``ε² − ‖δ‖²``) into ``W₁`` with a fresh pattern and zeroes ``W₂``::

      ε_avail,i = sqrt(‖δ_{W₁∪W₂,i}‖² + max(ε² − ‖δ‖², 0) / C)
      t = ρ_i η* + δ_{W₁,i} / ‖δ_{W₁,i}‖          ρ_i ~ U{−1, 1}
      δ_{W₂,i} ← 0;  δ_{W₁,i} ← ε_avail,i · t / ‖t‖

  which keeps ``‖δ‖₂ = ε`` before the clip to the box. ``η*`` is the unit-norm pattern
  ``[η^(s,⌊s/2⌋), −η^(s,s−⌊s/2⌋)]`` (two halves of opposite sign), transposed with probability
  1/2, where ``η^(h₁,h₂)_{r,c} = Σ_{k=0}^{M(r,c)} 1 / (n + 1 − k)²``, ``n = ⌊h₁/2⌋`` and
  ``M(r,c) = n − max(|r − ⌊h₁/2⌋ − 1|, |c − ⌊h₂/2⌋ − 1|)`` (1-based r, c).

The model runs under ``torch.no_grad()`` on inputs that never require grad, in the train/eval
mode the caller set. Querying only the images still standing needs one host synchronization per
iteration (to know which they are); it also ends the loop as soon as every image is broken.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyadvk import _checks
from pyadvk.attacks.pgd import Attack
from pyadvk.nn.normalize import NormalizeArg

LOSSES = ("margin", "ce")
# The paper's schedule: p is halved after these iterations of a 10,000-query run.
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(iteration: int, n_queries: int, p_init: float) -> float:
    """The share of pixels of the square at ``iteration`` (0-based) of ``n_queries``: ``p_init``
    halved once per point of :data:`P_HALVINGS` passed, on the paper's 10,000-query scale."""
    scaled = int(iteration / n_queries * 10000)
    return p_init / 2 ** sum(scaled > t for t in P_HALVINGS)


def centred_pattern(h1: int, h2: int, device: torch.device | None = None) -> torch.Tensor:
    """The paper's ``η^(h₁,h₂)`` of shape (h₁, h₂): concentric rectangles whose value grows
    towards the centre, ``Σ_{k=0}^{M(r,c)} 1/(n+1−k)²`` (see the module docstring)."""
    n = h1 // 2
    r = torch.arange(1, h1 + 1, device=device)[:, None]
    c = torch.arange(1, h2 + 1, device=device)[None, :]
    m = n - torch.maximum((r - h1 // 2 - 1).abs(), (c - h2 // 2 - 1).abs())
    sums = torch.cumsum(1.0 / (n + 1 - torch.arange(n + 1, device=device, dtype=torch.float32)) ** 2, 0)
    return torch.where(m >= 0, sums[m.clamp(0, n)], torch.zeros((), device=device))


def meta_pattern(s: int, device: torch.device | None = None) -> torch.Tensor:
    """``[η^(s,⌊s/2⌋), −η^(s,s−⌊s/2⌋)]`` of shape (s, s), scaled to unit L2 norm."""
    k = s // 2
    halves = [-centred_pattern(s, s - k, device)]
    if k:
        halves.insert(0, centred_pattern(s, k, device))
    eta = torch.cat(halves, dim=1)
    return eta / eta.norm()


class Square(Attack):
    """Square Attack, untargeted, L∞ or L2 (see the module docstring for the algorithm).

    Args:
        model: maps images (B, C, H, W) in [lower, upper] to logits (B, K). Only its outputs are
            read (no gradient); it runs in the mode the caller set.
        norm: "linf" or "l2".
        eps: radius of the ball (> 0; 0 returns the images).
        n_queries: model evaluations per image and restart, counting the initialization (>= 1).
        p_init: initial share of pixels in the square, in (0, 1].
        restarts: independent runs; each restart attacks only the images still standing and an
            image keeps the point of lowest loss over the restarts.
        loss: "margin" (``z_y − max_{k≠y} z_k``, the paper's) or "ce" (``log softmax(z)_y``, i.e.
            ascend the cross-entropy). Either way an image is broken when its margin is < 0.
        seed: seeds a generator on the images' device; the same call gives the same images.
        lower, upper: the valid input range.
        normalize: ``(mean, std)`` for a model that expects normalized inputs (see
            :class:`pyadvk.attacks.pgd.Attack`); eps and the images stay in pixel space.

    After a call, ``queries`` is a (B,) int64 tensor: the model evaluations each image cost
    (initializations and iterations over all restarts; the clean check of every image is not
    counted). Images the model already misclassifies cost 0 and are returned unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        loss: str = "margin",
        seed: int = 0,
        lower: float = 0.0,
        upper: float = 1.0,
        normalize: NormalizeArg = None,
    ) -> None:
        super().__init__(
            model, eps=_checks.real("eps", eps, low=0.0), norm=norm, lower=lower, upper=upper, normalize=normalize
        )
        self.n_queries = _checks.integer("n_queries", n_queries, low=1)
        self.p_init = _checks.real("p_init", p_init, low=0.0, low_inclusive=False)
        if self.p_init > 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")
        self.restarts = _checks.integer("restarts", restarts, low=1)
        self.loss_name = _checks.choice("loss", loss, LOSSES)
        self.seed = _checks.integer("seed", seed)
        self.queries: torch.Tensor | None = None
        self._tables_key: tuple | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))

    # ----------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D (B, C, H, W) for Square, got shape {tuple(images.shape)}")
        n = images.shape[0]
        queries = torch.zeros(n, dtype=torch.int64, device=images.device)
        self.queries = queries
        x_best = images.clone()
        if n == 0:
            return x_best
        gen = torch.Generator(device=images.device)
        gen.manual_seed(self.seed)
        with torch.no_grad():
            logits = self.model(images)
            self.check_logits(logits, labels)
            if self.eps == 0:
                return x_best
            best_loss, margin = self._objective(logits, labels)
            standing = margin >= 0
            for _ in range(self.restarts):
                idx = standing.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                x_adv, loss, margin_r, used = self._run(images[idx], labels[idx], gen)
                queries[idx] += used
                keep = (loss < best_loss[idx]) | (margin_r < 0)
                x_best[idx] = torch.where(keep.view(-1, 1, 1, 1), x_adv, x_best[idx])
                best_loss[idx] = torch.where(keep, loss, best_loss[idx])
                standing[idx] = margin_r >= 0
        return x_best

    def _objective(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimize, margin) per image, both (n,)."""
        z = logits.float()
        col = labels[:, None]
        margin = z.gather(1, col).squeeze(1) - z.scatter(1, col, float("-inf")).amax(1)
        if self.loss_name == "margin":
            return margin, margin
        return torch.log_softmax(z, 1).gather(1, col).squeeze(1), margin

    def _run(
        self, x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart on the images x (all standing): (best images, loss, margin, queries used).

        The loop works on a compacted copy of the images still standing (``rows`` of x), so an
        iteration costs no gather or scatter; the copy shrinks only when an image breaks.
        """
        n = x.shape[0]
        x32 = x.float()
        init = self._init_linf(x32, gen) if self.norm == "linf" else self._init_l2(x32, gen)
        out_adv = init.clamp_(self.lower, self.upper)
        out_loss, out_margin = self._objective(self.model(out_adv.to(x.dtype)), labels)
        used = torch.ones(n, dtype=torch.int64, device=x.device)
        rows = (out_margin >= 0).nonzero().squeeze(1)
        work = [x32[rows], out_adv[rows], out_loss[rows], out_margin[rows], labels[rows]]
        if self.norm == "linf":  # the two vertex values of every pixel, clipped to the box
            work += [(work[0] + self.eps).clamp_(max=self.upper), (work[0] - self.eps).clamp_(min=self.lower)]
        it = 1
        while it < self.n_queries and rows.numel():
            p = p_schedule(it, self.n_queries, self.p_init)
            if self.norm == "linf":
                cand = self._propose_linf(work[1], work[5], work[6], p, gen)
            else:
                cand = self._propose_l2(work[0], work[1], p, gen)
            new_loss, new_margin = self._objective(self.model(cand.to(x.dtype)), work[4])
            better = new_loss < work[2]
            if self.loss_name != "margin":
                better |= new_margin < 0
            work[1] = torch.where(better.view(-1, 1, 1, 1), cand, work[1])
            work[2] = torch.where(better, new_loss, work[2])
            work[3] = work[2] if self.loss_name == "margin" else torch.where(better, new_margin, work[3])
            it += 1
            broke = work[3] < 0
            if bool(broke.any()):  # write the broken images back and drop them from the work set
                done = rows[broke]
                out_adv[done], out_loss[done], out_margin[done] = work[1][broke], work[2][broke], work[3][broke]
                used[done] = it
                keep = ~broke
                rows = rows[keep]
                work = [t[keep] for t in work]
        out_adv[rows], out_loss[rows], out_margin[rows] = work[1], work[2], work[3]
        used[rows] = it
        return out_adv.to(x.dtype), out_loss, out_margin, used

    def _side(self, p: float, height: int, width: int, smallest: int) -> int:
        largest = max(min(height, width) - 1, 1)
        return min(max(int(round(math.sqrt(p * height * width))), min(smallest, largest)), largest)

    def _window(self, n: int, side: int, height: int, width: int, gen: torch.Generator, device) -> torch.Tensor:
        """Masks (n, 1, H, W) of side×side squares at uniformly drawn positions, one per image."""
        key = (side, height, width, device)
        if self._tables_key != key:  # one-hot rows of every position's square (side changes rarely)
            h, w = torch.arange(height, device=device), torch.arange(width, device=device)
            r, c = torch.arange(height - side + 1, device=device), torch.arange(width - side + 1, device=device)
            self._tables = ((h >= r[:, None]) & (h < r[:, None] + side), (w >= c[:, None]) & (w < c[:, None] + side))
            self._tables_key = key
        rows_t, cols_t = self._tables
        r = torch.randint(0, rows_t.shape[0], (n,), generator=gen, device=device)
        c = torch.randint(0, cols_t.shape[0], (n,), generator=gen, device=device)
        return (rows_t[r][:, :, None] & cols_t[c][:, None, :])[:, None]

    def _signs(self, shape: tuple[int, ...], gen: torch.Generator, device) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=device).float().mul_(2).sub_(1)

    # ----- L∞ -------------------------------------------------------------------------------

    def _init_linf(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, _, w = x.shape
        return x + self.eps * self._signs((n, c, 1, w), gen, x.device)

    def _propose_linf(
        self, x_adv: torch.Tensor, x_plus: torch.Tensor, x_minus: torch.Tensor, p: float, gen: torch.Generator
    ) -> torch.Tensor:
        n, c, h, w = x_adv.shape
        window = self._window(n, self._side(p, h, w, 1), h, w, gen, x_adv.device)
        up = torch.randint(0, 2, (n, c, 1, 1), generator=gen, device=x_adv.device, dtype=torch.bool)
        cand = torch.where(window, torch.where(up, x_plus, x_minus), x_adv)
        # a proposal equal to the current image would waste a query: flip its first channel
        up[:, 0] ^= (cand == x_adv).flatten(1).all(1)[:, None, None]
        return torch.where(window, torch.where(up, x_plus, x_minus), x_adv)

    # ----- L2 -------------------------------------------------------------------------------

    def _init_l2(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        side = max(min(h, w) // 5, 1)
        th, tw = h // side, w // side
        tile = centred_pattern(side, side, x.device)
        signs = self._signs((n, c, th, tw), gen, x.device)
        grid = signs.repeat_interleave(side, 2).repeat_interleave(side, 3) * tile.repeat(th, tw)
        delta = torch.zeros_like(x)
        delta[:, :, : th * side, : tw * side] = grid
        return x + self._to_radius(delta)

    def _to_radius(self, delta: torch.Tensor) -> torch.Tensor:
        norm = delta.flatten(1).norm(dim=1).clamp_min(torch.finfo(delta.dtype).tiny)
        return delta * (self.eps / norm).view(-1, 1, 1, 1)

    def _propose_l2(self, x: torch.Tensor, x_adv: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        side = self._side(p, h, w, 2)
        delta = x_adv - x
        w1 = self._window(n, side, h, w, gen, x.device)
        w2 = self._window(n, side, h, w, gen, x.device)
        sq = delta.square()
        unused = (self.eps**2 - sq.flatten(1).sum(1)).clamp_min(0)
        avail = (torch.where(w1 | w2, sq, 0).sum((2, 3)) + unused[:, None] / c).sqrt()
        w1_norm = torch.where(w1, sq, 0).sum((2, 3)).sqrt()
        # the unit pattern filling W1 (row-major), transposed for a random half of the images
        eta = meta_pattern(side, x.device)
        flip = torch.randint(0, 2, (n,), generator=gen, device=x.device, dtype=torch.bool)
        placed = torch.zeros_like(delta[:, :1])
        placed[w1] = torch.where(flip[:, None], eta.T.reshape(1, -1), eta.reshape(1, -1)).flatten()
        rho = self._signs((n, c, 1, 1), gen, x.device)
        tiny = torch.finfo(x.dtype).tiny
        scale = torch.where(w1_norm > 0, 1 / w1_norm.clamp_min(tiny), 0)
        t = rho * placed + torch.where(w1, delta, 0) * scale[:, :, None, None]
        fresh = t * (avail / t.square().sum((2, 3)).sqrt().clamp_min(tiny))[:, :, None, None]
        delta = torch.where(w1, fresh, torch.where(w2, 0, delta))
        norm = delta.flatten(1).norm(dim=1).clamp_min(tiny)
        delta = delta * torch.clamp(self.eps / norm, max=1.0).view(-1, 1, 1, 1)
        return (x + delta).clamp_(self.lower, self.upper)
