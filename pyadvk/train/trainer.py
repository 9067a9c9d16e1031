"""A small training loop around any pyadvk loss: progress bars, mixed precision, channels_last,
a checkpoint at the end of every epoch, and resume from it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pyadvk import _checks, distributed
from pyadvk._io import check_archive, save_torch
from pyadvk.train.adversarial import pgd_adversarial_loss

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def loss_terms(loss_fn: object) -> dict[str, float]:
    """The scalar terms a loss object reports for its last batch: the 0-dim floating-point tensors
    (or numbers) in its ``last`` dict (e.g. :class:`pyadvk.train.RobustLoss`: ``ce``, ``penalty``,
    ``psi``), as floats; {} for a loss without one."""
    last = getattr(loss_fn, "last", None)
    if not isinstance(last, dict):
        return {}
    terms = {}
    for name, value in last.items():
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
            terms[str(name)] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            terms[str(name)] = float(value)
    return terms


def format_record(record: dict, epochs: int | None = None) -> str:
    """One line for an epoch's record: training loss, the loss's terms (e.g. ce, penalty, psi),
    test accuracy, seconds."""
    terms = "".join(f", {name} {value:.4g}" for name, value in record.get("terms", {}).items())
    accuracy = f", test accuracy {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
    of = f"/{epochs}" if epochs else ""
    return f"epoch {record['epoch']}{of}: loss {record['train_loss']:.4f}{terms}{accuracy}, {record['seconds']:.1f} s"


class AdversarialTrainer:
    """Trains ``model`` with ``loss_fn(model, images, labels) -> loss`` for ``epochs`` epochs.

    Args:
        model, optimizer: what to train and how; ``scheduler`` (optional) steps once per epoch.
        train_loader: yields ``(images, labels)``; ``test_loader`` (optional) is evaluated for
            clean accuracy after every epoch.
        loss_fn: default PGD-7 adversarial training (:func:`pgd_adversarial_loss`). A loss object
            with ``state_dict``/``load_state_dict`` (e.g. one holding an adaptive weight) is saved in
            the checkpoint too. One with a ``last`` dict of 0-dim tensors (the last batch's terms,
            e.g. :class:`RobustLoss`'s ``ce``, ``penalty`` and ``psi``) has each term's mean over
            the epoch's batches (weighted by batch size) in the epoch's record, as ``terms``.
        checkpoint_dir: where ``checkpoint.pt`` is written (atomically) after every epoch; with
            ``resume=True`` an existing one is loaded and training continues after its epoch.
        amp: None, "bf16" or "fp16" (autocast; fp16 with a gradient scaler).
        channels_last: convert the model and every batch to channels_last.
        progress: progress bars, and one line per epoch (:func:`format_record`: loss, the loss's
            terms, test accuracy, time) on rank 0.
        settings: the run's hyperparameters as a JSON-able dict (e.g. learning rate, loss, budget),
            stored in the checkpoint. Resuming a checkpoint written with other settings is refused
            (ValueError listing each difference) unless ``override_settings=True``, which continues
            with the new settings (and the new learning rates) from the checkpoint's weights.

    In a torch.distributed process group (e.g. under ``torchrun``) the model is wrapped in
    DistributedDataParallel; each rank trains on its loader's shard (use
    :func:`pyadvk.distributed.shard_loader` with ``shuffle=True``: the trainer calls its
    ``set_epoch``), the attacks inside pyadvk's losses run on the unwrapped module (input-only
    gradients, no all-reduce), reported losses and accuracies are summed over ranks, and only rank 0
    writes the checkpoint, which records the world size it needs to resume.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        *,
        loss_fn: LossFn = pgd_adversarial_loss,
        epochs: int = 10,
        test_loader: DataLoader | None = None,
        scheduler=None,
        device: torch.device | str | None = None,
        checkpoint_dir: str | None = None,
        resume: bool = True,
        amp: str | None = None,
        channels_last: bool = False,
        progress: bool = True,
        settings: dict | None = None,
        override_settings: bool = False,
    ) -> None:
        self.epochs = _checks.integer("epochs", epochs, low=0)
        if amp is not None:
            _checks.choice("amp", amp, tuple(AMP_DTYPES))
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        model = distributed.unwrap(model).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in torch's stubs
        self.module = model
        self.model = model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.test_loader = train_loader, test_loader
        self.loss_fn = loss_fn
        self.checkpoint_dir = checkpoint_dir
        self.amp, self.channels_last, self.progress = amp, channels_last, progress
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.epoch = 0
        self.history: list[dict] = []
        self.settings = None if settings is None else dict(settings)
        self.override_settings = bool(override_settings)
        if checkpoint_dir and resume and os.path.exists(self.checkpoint_path):
            self.load_checkpoint(self.checkpoint_path)

    @property
    def checkpoint_path(self) -> str:
        if not self.checkpoint_dir:
            raise ValueError("no checkpoint_dir was given")
        return os.path.join(self.checkpoint_dir, "checkpoint.pt")

    def _batch(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _autocast(self):
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def train_epoch(self) -> dict:
        self.model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        total, count, start = 0.0, 0, time.perf_counter()
        terms: dict[str, float] = {}
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{self.epochs}",
            leave=False,
            disable=not self.progress or not distributed.is_main(),
        )
        for images, labels in bar:
            images, labels = self._batch(images, labels)
            with self._autocast():
                loss = self.loss_fn(self.model, images, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {self.epoch + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
            for name, value in loss_terms(self.loss_fn).items():
                terms[name] = terms.get(name, 0.0) + value * len(labels)
            bar.set_postfix(loss=f"{total / count:.4f}", **{n: f"{v / count:.4g}" for n, v in terms.items()})
        if self.scheduler is not None:
            self.scheduler.step()
        names = sorted(terms)
        total, count, *sums = distributed.all_reduce_sum([total, count, *(terms[n] for n in names)]).tolist()
        record = {"epoch": self.epoch + 1, "train_loss": total / max(count, 1), "seconds": time.perf_counter() - start}
        if names:
            record["terms"] = {n: v / max(count, 1) for n, v in zip(names, sums)}
        return record

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> float:
        """Clean accuracy on ``loader`` (model in eval mode for the pass, then restored); in a
        process group, over every rank's loader."""
        was_training = self.module.training
        self.module.eval()
        correct = total = 0
        for images, labels in loader:
            images, labels = self._batch(images, labels)
            with self._autocast():
                correct += int((self.module(images).argmax(dim=1) == labels).sum())
            total += len(labels)
        self.module.train(was_training)
        correct, total = distributed.all_reduce_sum([correct, total]).tolist()
        return correct / max(total, 1)

    def fit(self) -> list[dict]:
        """Trains the remaining epochs; returns the history (one dict per epoch)."""
        while self.epoch < self.epochs:
            record = self.train_epoch()
            if self.test_loader is not None:
                record["test_accuracy"] = self.evaluate(self.test_loader)
            self.epoch += 1
            self.history.append(record)
            if self.progress and distributed.is_main():
                tqdm.write(format_record(record, self.epochs))
            if self.checkpoint_dir:
                self.save_checkpoint(self.checkpoint_path)
        self.module.eval()
        return self.history

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "history": self.history,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "world_size": distributed.world_size(),
        }
        if self.settings is not None:
            state["settings"] = self.settings
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if hasattr(self.loss_fn, "state_dict"):
            state["loss"] = self.loss_fn.state_dict()
        return state

    def _check_settings(self, saved: dict | None) -> None:
        if self.settings is None or saved is None or self.override_settings:
            return
        keys = sorted(set(self.settings) | set(saved))
        diff = [k for k in keys if self.settings.get(k) != saved.get(k)]
        if diff:
            lines = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {self.settings.get(k)!r} now" for k in diff)
            raise ValueError(
                f"the checkpoint was written with other settings ({lines}). Resume with the checkpoint's "
                "settings, start over (--restart / resume=False), or continue from its weights with the new "
                "settings (--override-settings / override_settings=True)"
            )

    def load_state_dict(self, state: dict) -> None:
        distributed.check_world_size(state.get("world_size"), "this checkpoint")
        self._check_settings(state.get("settings"))
        new_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.override_settings:
            for group, lr in zip(self.optimizer.param_groups, new_lrs):
                group["lr"] = lr
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if "loss" in state and hasattr(self.loss_fn, "load_state_dict"):
            self.loss_fn.load_state_dict(state["loss"])
        torch.set_rng_state(state["rng"].cpu())
        self.epoch, self.history = int(state["epoch"]), list(state["history"])

    def save_checkpoint(self, path: str) -> None:
        """Rank 0 writes (atomically); every rank waits until the file is complete."""
        if distributed.is_main():
            save_torch(self.state_dict(), path)
        distributed.barrier()

    def load_checkpoint(self, path: str) -> None:
        check_archive(path, "checkpoint")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise ValueError(f"checkpoint {path!r} does not load: {exc}") from exc
        self.load_state_dict(state)
