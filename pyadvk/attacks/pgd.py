"""Gradient attacks on the fused step: PGD (L∞), PGDL2, FGSM, with targeted and momentum options.

Call shape is torchattacks': ``adv = PGD(model, eps=8/255, alpha=2/255, steps=10)(images, labels)``.
Unlike torchattacks, the model's train/eval mode is left exactly as the caller set it (torchattacks
switches the model to eval during the attack), and gradients are taken with respect to the input
only (``torch.autograd.grad``): no parameter ``.grad`` is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Hashable

import torch
from torch import nn

from pyadvk import _checks
from pyadvk._backend import get_backend
from pyadvk._modules import guarded_call
from pyadvk.attacks import _common, _graphs
from pyadvk.nn.normalize import NormalizeArg, as_normalize, with_normalization
from pyadvk.ops import pgd as _pgd

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GRAPH_WARMUP = 2  # eager steps before the first capture of a key (the first also checks the logits)


class Attack:
    """Base class: an object called as ``attack(images, labels) -> adv_images``.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, C).
        eps: radius of the perturbation ball (>= 0), a float or a per-sample (B,) tensor.
        norm: "linf" or "l2".
        targeted: if True, ``labels`` are the target classes and the attack minimizes their loss.
        loss: ``loss(logits, labels) -> scalar`` to maximize (untargeted) or minimize (targeted);
            default ``nn.CrossEntropyLoss()`` (mean over the batch, as torchattacks).
        lower, upper: the valid input range; images outside it are rejected.
        backend: force a body of the fused step ("cuda", "triton", "cpp", "torch").
        autocast: run the model's forward and backward under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``; ``None``: full precision). The images,
            the perturbation and the step stay float32; only the model's arithmetic is reduced.
        channels_last: keep 4-D images (and so the model's activations) in channels_last
            memory format, which tensor-core convolutions prefer.
        normalize: ``(mean, std)`` (or a :class:`pyadvk.nn.Normalize`) for a model that expects
            ``(x − mean) / std``: the attack runs on ``Normalize(mean, std) ∘ model``, so images,
            eps and the result stay in pixel space (torchattacks' ``set_normalization_used``).

    Every call checks its inputs once (:func:`pyadvk.attacks._common.check_inputs`: float images
    in ``[lower, upper]``, labels of any integer dtype and shape (B,), each in ``[0, C)`` of the
    model's output), leaves the model's buffers and train/eval flags exactly as it found them,
    and works under ``torch.inference_mode()`` (see :mod:`pyadvk.attacks._common`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | torch.Tensor,
        norm: str,
        targeted: bool = False,
        loss: LossFn | None = None,
        lower: float = 0.0,
        upper: float = 1.0,
        backend: str | None = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        normalize: NormalizeArg = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be callable as loss(logits, labels), got {type(loss).__name__}")
        self.normalize = as_normalize(normalize)
        self.model = with_normalization(model, self.normalize)
        self.norm = _checks.choice("norm", norm, _pgd.NORMS)
        if not isinstance(eps, torch.Tensor):
            _checks.real("eps", eps, low=0.0)
        self.eps = eps
        self.targeted = bool(targeted)
        self.loss = loss if loss is not None else nn.CrossEntropyLoss()
        self.lower, self.upper = _checks.bounds(lower, upper)
        self.backend = backend
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        self.channels_last = bool(channels_last)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The adversarial images: :meth:`forward` after the input checks, with the model's state
        preserved and out of inference mode (see the class docstring)."""
        return guarded_call(self.guarded_models(), self._checked_forward, images, labels)

    def _checked_forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(images, labels)
        return self.forward(images.detach(), labels.long())

    def guarded_models(self) -> list[nn.Module]:
        """The models whose state a call preserves."""
        return [self.model]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attack itself, on checked inputs (int64 labels); call the attack, not this."""
        raise NotImplementedError

    def check_inputs(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Rejects bad images/labels before any work (one device sync for the value checks)."""
        _common.check_inputs(images, labels, self.lower, self.upper)
        if self.channels_last and images.dim() != 4:
            raise ValueError(f"channels_last=True needs 4-D images (B, C, H, W), got shape {tuple(images.shape)}")

    def check_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The model's output must be (B, C) logits with every label in [0, C)."""
        _common.check_logits(logits, labels)

    def input_grad(self, x: torch.Tensor, labels: torch.Tensor, first: bool = False) -> torch.Tensor:
        """Gradient of the attack objective with respect to the input only (to ascend)."""
        x = x.detach().requires_grad_(True)
        amp = (
            torch.autocast(x.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), amp:
            logits = self.model(x)
            if first:
                self.check_logits(logits, labels)
            loss = self.loss(logits.float(), labels)
            if self.targeted:
                loss = -loss
        (grad,) = torch.autograd.grad(loss, x)
        return grad

    def __repr__(self) -> str:
        skip = ("model", "models", "loss") + (("normalize",) if self.normalize is None else ())
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in skip)
        return f"{type(self).__name__}({fields})"


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018), L∞ by default.

    ``x_0 = random_init(x)`` (or ``x``); ``x_{k+1} = pgd_step(x_k, x, ∇_x L(f(x_k), y))`` for
    ``steps`` steps, each one fused kernel on the cuda/triton/cpp bodies, written in place.

    With ``decay > 0`` it is MI-FGSM (Dong et al. 2018): the step follows the momentum
    ``m = decay * m + g / mean(|g|)`` (per sample) instead of g.

    With ``random_start=False`` the result equals torchattacks' PGD (and PGDL2 for
    ``norm="l2"``) on the same model and inputs, up to fp32 rounding.

    Fast modes (see also ``autocast`` and ``channels_last`` in :class:`Attack`):
    ``cuda_graph=True`` captures one whole step (forward, input-gradient backward, fused step
    written into the preallocated adversarial batch) as a CUDA graph on the images' device after
    two eager warm-up steps and replays it for the remaining steps, removing per-kernel launch
    overhead. The captured step is kept per (shape, dtype, layout, device, model, settings) and
    replayed by later calls (one eager step each, which checks the logits; no new capture; see
    :mod:`pyadvk.attacks._graphs`) until :meth:`release_graphs` or the attack is deleted. It
    needs CUDA images, a model without host synchronization or data-dependent control flow in its
    forward, and the same step count semantics as eager (results are identical to eager).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor = 8 / 255,
        alpha: float | torch.Tensor = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        *,
        norm: str = "linf",
        decay: float = 0.0,
        targeted: bool = False,
        loss: LossFn | None = None,
        lower: float = 0.0,
        upper: float = 1.0,
        backend: str | None = None,
        generator: torch.Generator | None = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        normalize: NormalizeArg = None,
    ) -> None:
        super().__init__(
            model,
            eps=eps,
            norm=norm,
            targeted=targeted,
            loss=loss,
            lower=lower,
            upper=upper,
            backend=backend,
            autocast=autocast,
            channels_last=channels_last,
            normalize=normalize,
        )
        self.cuda_graph = bool(cuda_graph)
        self._graphs = _graphs.GraphCache()
        if not isinstance(alpha, torch.Tensor):
            _checks.real("alpha", alpha, low=0.0, low_inclusive=False)
        self.alpha = alpha
        self.steps = _checks.integer("steps", steps, low=0)
        self.random_start = bool(random_start)
        self.decay = _checks.real("decay", decay, low=0.0)
        self.generator = generator

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.cuda_graph:
            _graphs.check_device(images)
        images = images.detach()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if images.numel() == 0:
            return images.clone()
        params = _pgd.step_params(images, self.eps, self.alpha, self.norm, self.lower, self.upper)
        if self.random_start:
            x_adv = _pgd.random_init(
                images,
                eps=self.eps,
                norm=params.norm,
                lower=params.lower,
                upper=params.upper,
                generator=self.generator,
                backend=self.backend,
                check_values=False,
            )
        else:
            x_adv = images.clone()
        if self.cuda_graph and self.steps > GRAPH_WARMUP:
            return self._graphed(images, labels, x_adv, params)
        momentum = torch.zeros_like(images, dtype=torch.float32) if self.decay > 0 else None
        for k in range(self.steps):
            self._step(x_adv, images, labels, momentum, params, first=k == 0)
        return x_adv

    def _step(self, x_adv, images, labels, momentum, params, first: bool = False) -> None:
        """One step in place: forward, input-gradient backward, the fused step into ``x_adv``."""
        grad = self.input_grad(x_adv, labels, first=first)
        if momentum is not None:
            grad = self._momentum(momentum, grad).to(grad.dtype)
        with torch.no_grad():
            _pgd.run_step(params, x_adv, images, grad, inplace=True, backend=self.backend)

    def release_graphs(self) -> None:
        """Frees the CUDA graphs (and their memory pools) that ``cuda_graph=True`` keeps between
        calls; the next call captures again. Deleting the attack frees them too."""
        self._graphs.clear()

    def _graph_key(self, images: torch.Tensor, params) -> Hashable:
        """What the captured step depends on besides the values copied in before each replay."""
        return (
            _graphs.tensor_key(images),
            (params.norm, params.eps, params.alpha, params.lower, params.upper),
            (_graphs.tensor_key(params.eps_t), _graphs.tensor_key(params.alpha_t)),
            (self.decay, self.targeted, id(self.loss), self.autocast, self.backend, get_backend()),
            _graphs.model_key(self.model),
        )

    def _graphed(self, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, params) -> torch.Tensor:
        """The steps with one step captured as a CUDA graph on the images' device and replayed.
        The first call with a key runs GRAPH_WARMUP eager steps on a side stream, then captures;
        later calls copy their inputs into the captured step's tensors, run one eager step (it
        checks the logits against the labels) and replay the rest. Same result as eager."""
        key = self._graph_key(images, params)
        entry = self._graphs.get(key)
        with _graphs.on_device(images.device):
            if entry is None:
                entry = _CapturedStep(images, labels, start, params, momentum=self.decay > 0)
                run = entry.step_with(self)

                def warmup() -> None:
                    for k in range(GRAPH_WARMUP):
                        run(first=k == 0)

                entry.graph = _graphs.capture(images.device, run, warmup=warmup)
                self._graphs.put(key, entry)
                replays = self.steps - GRAPH_WARMUP
            else:
                entry.load(images, labels, start, params)
                entry.step_with(self)(first=True)
                replays = self.steps - 1
            for _ in range(replays):
                entry.graph.replay()
            return entry.x_adv.clone()  # the static buffer is the next call's

    def _momentum(self, momentum: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        g = grad.float()
        scale = g.abs().reshape(g.shape[0], -1).mean(dim=1)
        scale = torch.where(scale > 0, scale, 1.0).view((-1,) + (1,) * (g.dim() - 1))
        return momentum.mul_(self.decay).add_(g / scale)


class _CapturedStep:
    """The static tensors one captured PGD step reads and writes (copies of a call's inputs and
    the adversarial batch it updates in place), and its graph."""

    def __init__(self, images, labels, start, params, momentum: bool) -> None:
        self.images, self.labels, self.x_adv = images.clone(), labels.clone(), start.clone()
        self.momentum = torch.zeros_like(images, dtype=torch.float32) if momentum else None
        eps_t, alpha_t = (None if t is None else t.clone() for t in (params.eps_t, params.alpha_t))
        self.params = dataclasses.replace(params, eps_t=eps_t, alpha_t=alpha_t)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, images, labels, start, params) -> None:
        """Copies a new call's inputs (same key) into the static tensors."""
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.x_adv.copy_(start)
        if self.momentum is not None:
            self.momentum.zero_()
        for static, new in ((self.params.eps_t, params.eps_t), (self.params.alpha_t, params.alpha_t)):
            if static is not None:
                static.copy_(new)

    def step_with(self, attack: PGD) -> Callable[..., None]:
        """``step(first=False)``: one step of ``attack`` on the static tensors (the entry keeps
        no reference to the attack, so that deleting the attack frees its graphs at once)."""
        return functools.partial(attack._step, self.x_adv, self.images, self.labels, self.momentum, self.params)


class PGDL2(PGD):
    """PGD in the L2 ball: ``PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=True)``."""

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor = 1.0,
        alpha: float | torch.Tensor = 0.2,
        steps: int = 10,
        random_start: bool = True,
        **kwargs,
    ) -> None:
        if "norm" in kwargs:
            raise TypeError("PGDL2 takes no norm= argument (it is always 'l2'); use PGD(norm=...)")
        super().__init__(model, eps, alpha, steps, random_start, norm="l2", **kwargs)


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one L∞ step of size eps from the image,
    ``clamp(x + eps * sign(∇_x L), lower, upper)``."""

    def __init__(self, model: nn.Module, eps: float | torch.Tensor = 8 / 255, **kwargs) -> None:
        for name in ("norm", "alpha", "steps", "random_start", "decay"):
            if name in kwargs:
                raise TypeError(f"FGSM takes no {name}= argument (it is one L∞ step of size eps)")
        # The step size is eps; where eps = 0 any step is projected back onto the image.
        alpha: float | torch.Tensor
        if isinstance(eps, torch.Tensor):
            alpha = torch.where(eps > 0, eps, torch.ones_like(eps))
        else:
            alpha = eps if _checks.real("eps", eps, low=0.0) > 0 else 1.0
        super().__init__(model, eps, alpha, 1, False, **kwargs)
