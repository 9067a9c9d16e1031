"""pyadvk in Lightning (``pip install pyadvk[lightning]``).

* :class:`RobustAccuracy`: a callback that measures robust accuracy (PGD, or AutoAttack) on a
  loader every ``every_n_epochs`` validation epochs and logs it (``robust_accuracy`` by default,
  with ``clean_accuracy`` beside it). Lightning runs validation, ``trainer.validate`` and
  ``trainer.test`` under ``torch.inference_mode()``, where no gradient can be taken; the callback
  leaves inference mode for its own pass (``torch.inference_mode(False)`` and
  ``torch.enable_grad()``, the batches re-read outside it), so attacks run there as anywhere.
* :func:`adversarial_training_step`: a ready ``training_step`` body that trains on one of
  :mod:`pyadvk.train`'s losses (default PGD-7 adversarial training, Madry et al.) and logs the
  loss and the loss's own terms (``RobustLoss``: ce, penalty, psi).

Example (a LightningModule whose ``forward`` maps [0, 1] images to logits)::

    class Net(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            return adversarial_training_step(self, batch, loss_fn=pgd_loss)

    trainer = lightning.Trainer(max_epochs=10, callbacks=[RobustAccuracy(val_loader, eps=8 / 255)])

See ``examples/lightning_adversarial.py`` for a complete run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pyadvk.integrations.lightning needs Lightning: pip install 'pyadvk[lightning]' (or pip install lightning)"
    ) from exc

from pyadvk import _checks
from pyadvk.attacks import PGD, AutoAttack
from pyadvk.metrics import robust_accuracy
from pyadvk.nn.normalize import NormalizeArg
from pyadvk.train import pgd_adversarial_loss
from pyadvk.train.trainer import loss_terms

ATTACKS = ("pgd", "autoattack")
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _first_loader(loaders: Any) -> DataLoader | None:
    """The first DataLoader of what Lightning holds as val_dataloaders (one, a list or a dict)."""
    if isinstance(loaders, DataLoader) or loaders is None:
        return loaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and loaders:
        return loaders[0]
    return None


class RobustAccuracy(L.Callback):
    """Logs robust accuracy under an attack every ``every_n_epochs`` validation epochs.

    Args:
        dataloader: the images to attack, in [0, 1] (default: the trainer's first validation
            loader). ``max_images`` limits the count (the first N).
        attack: ``"pgd"`` (PGD-``steps`` with step ``2.5·eps/steps``, random start, seeded),
            ``"autoattack"`` (the standard AutoAttack), or a callable ``attack(model) -> attack``
            building any pyadvk attack (or ``attack(images, labels) -> adv_images``) for the model.
        norm, eps, steps: the threat model and PGD's iterations.
        every_n_epochs: measure after every N-th validation epoch (the sanity check is skipped);
            ``trainer.validate()`` and ``trainer.test()`` always measure.
        normalize: ``(mean, std)`` when the module expects normalized inputs (see
            :class:`pyadvk.nn.Normalize`); budgets stay in pixel space.
        n_classes: classes of the model (AutoAttack's targeted components).
        name: the logged key (``clean_<suffix>`` is logged too, unless ``log_clean=False``).
        prog_bar: show the value in the progress bar.

    ``last`` holds the last measurement, ``{"epoch", "robust_accuracy", "clean_accuracy"}``.
    The model is evaluated in eval mode and put back in its mode afterwards; its weights and
    buffers are unchanged and no parameter gradient is created.
    """

    def __init__(
        self,
        dataloader: DataLoader | None = None,
        *,
        attack: str | Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "pgd",
        norm: str = "linf",
        eps: float = 8 / 255,
        steps: int = 20,
        every_n_epochs: int = 1,
        max_images: int | None = None,
        normalize: NormalizeArg = None,
        n_classes: int = 10,
        seed: int = 0,
        name: str = "robust_accuracy",
        log_clean: bool = True,
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        if not callable(attack):
            _checks.choice("attack", attack, ATTACKS)
        self.dataloader = dataloader
        self.attack = attack
        self.norm = norm
        self.eps = _checks.real("eps", eps, low=0.0, low_inclusive=False)
        self.steps = _checks.integer("steps", steps, low=1)
        self.every_n_epochs = _checks.integer("every_n_epochs", every_n_epochs, low=1)
        self.max_images = None if max_images is None else _checks.integer("max_images", max_images, low=1)
        self.normalize = normalize
        self.n_classes = _checks.integer("n_classes", n_classes, low=2)
        self.seed = seed
        self.name, self.log_clean, self.prog_bar = name, log_clean, prog_bar
        self.last: dict[str, float] = {}

    def build_attack(self, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The attack on ``model`` (the LightningModule), as configured."""
        if callable(self.attack):
            return self.attack(model)
        if self.attack == "autoattack":
            return AutoAttack(
                model, norm=self.norm, eps=self.eps, n_classes=self.n_classes, seed=self.seed, normalize=self.normalize
            )
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(self.seed)
        return PGD(
            model,
            eps=self.eps,
            alpha=2.5 * self.eps / self.steps,
            steps=self.steps,
            norm=self.norm,
            generator=generator,
            normalize=self.normalize,
        )

    def measure(self, module: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Clean and robust accuracy of ``module`` on ``loader`` (outside inference mode, eval mode,
        the module's mode restored)."""
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                device = next(module.parameters()).device
                kwargs: dict[str, Any] = dict(
                    n=self.max_images, device=device, progress=False, normalize=self.normalize
                )
                result = {"robust_accuracy": robust_accuracy(module, loader, self.build_attack(module), **kwargs)}
                if self.log_clean:
                    result["clean_accuracy"] = robust_accuracy(module, loader, None, **kwargs)
        finally:
            module.train(was_training)
        return result

    def _run(self, trainer: L.Trainer, module: L.LightningModule, loaders: Any) -> None:
        loader = self.dataloader if self.dataloader is not None else _first_loader(loaders)
        if loader is None:
            raise ValueError("RobustAccuracy has no images: pass dataloader= or give the trainer a validation loader")
        result = self.measure(module, loader)
        self.last = {"epoch": float(trainer.current_epoch), **result}
        module.log(self.name, result["robust_accuracy"], prog_bar=self.prog_bar)
        if "clean_accuracy" in result:
            suffix = self.name.split("_", 1)[1] if "_" in self.name else self.name
            module.log(f"clean_{suffix}", result["clean_accuracy"], prog_bar=self.prog_bar)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run(trainer, pl_module, trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, trainer.test_dataloaders)


def adversarial_training_step(
    module: L.LightningModule,
    batch: Sequence[torch.Tensor],
    loss_fn: LossFn | None = None,
    *,
    log: bool = True,
    name: str = "train_loss",
    prog_bar: bool = True,
) -> torch.Tensor:
    """The body of a LightningModule's ``training_step`` for adversarial training:
    ``loss_fn(module, images, labels)`` on the batch ``(images, labels)``, logged as ``name``
    with the loss's own terms (:func:`pyadvk.train.trainer.loss_terms`, e.g. ``RobustLoss``'s
    ``ce``, ``penalty`` and ``psi``, logged as ``train_ce`` ...).

    ``loss_fn``: any of :mod:`pyadvk.train`'s losses (default :func:`pgd_adversarial_loss`: PGD-7,
    L∞ 8/255, step 2/255); bind their budgets with ``functools.partial``. The attack inside takes
    input gradients only (Lightning's optimizer sees only the loss's parameter gradients) and runs
    under the precision Lightning set (its autocast). A stateful loss (``RobustLoss``) is best made
    an attribute of the module, so its state is in the module's checkpoint.
    """
    if not isinstance(batch, Sequence) or len(batch) < 2:
        raise ValueError(f"batch must be (images, labels, ...), got {type(batch).__name__}")
    images, labels = batch[0], batch[1]
    loss_fn = loss_fn if loss_fn is not None else functools.partial(pgd_adversarial_loss)
    loss = loss_fn(module, images, labels)
    if log:
        module.log(name, loss.detach(), prog_bar=prog_bar)
        prefix = name.split("_", 1)[0] if "_" in name else name
        for term, value in loss_terms(loss_fn).items():
            module.log(f"{prefix}_{term}", value)
    return loss


__all__ = ["ATTACKS", "RobustAccuracy", "adversarial_training_step"]
