"""``pyadvk train``: train a named architecture with one of pyadvk's losses; writes a pyadvk
model file, a resumable checkpoint and the history (all atomically)."""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Sequence

import torch

from pyadvk import distributed, models, train
from pyadvk._io import save_json
from pyadvk.cli import common

#: --eps when it is not given: the L∞ budget usual for each dataset (``folder`` data has none:
#: give --eps). The reference recipe's budgets are RMS ones (REFERENCE_EPS).
DEFAULT_EPS = {"digits": 0.1, "cifar10": 8 / 255}
#: --recipe reference: the paper's code's L2 budgets in RMS units (--loss pgd: its adversarial
#: training; --loss robust: the L2,min examples of its all-additions network).
REFERENCE_EPS = {"pgd": 0.01, "robust": 0.1}
RECIPES = ("pyadvk", "reference")


def training_eps(args: argparse.Namespace) -> float:
    """The training attack's budget: --eps, or the default of the dataset (--recipe pyadvk) or of
    the reference recipe (see DEFAULT_EPS and REFERENCE_EPS)."""
    if args.recipe == "reference" and args.loss not in REFERENCE_EPS:
        raise common.UserError(
            f"--recipe reference applies to --loss pgd or robust (the paper's recipes), got --loss {args.loss}"
        )
    if args.eps is not None:
        return common.parse_budget("--eps", args.eps)
    if args.recipe == "reference":
        return REFERENCE_EPS[args.loss]
    kind = args.data.partition(":")[0]
    if kind not in DEFAULT_EPS:
        raise common.UserError(
            f"--eps: no default budget for --data {args.data!r}; give the L∞ budget of the training attack "
            "(e.g. --eps 8/255 for CIFAR-like images, --eps 4/255 for ImageNet-like ones)"
        )
    return DEFAULT_EPS[kind]


def training_psi0(args: argparse.Namespace, input_shape: Sequence[int]) -> float:
    """--psi0, or ψ0 scaled to the data's input size (:func:`pyadvk.train.scaled_psi0`)."""
    if args.psi0 is not None:
        if not (math.isfinite(args.psi0) and args.psi0 > 0):
            raise common.UserError(f"--psi0 must be > 0 and finite, got {args.psi0}")
        return float(args.psi0)
    return train.scaled_psi0(input_shape)


def make_loss(
    args: argparse.Namespace, model: torch.nn.Module | None = None, input_shape: Sequence[int] | None = None
) -> Callable[..., torch.Tensor]:
    """The training loss named by --loss and --recipe, with the budget arguments (``model`` and
    one sample's ``input_shape`` are needed by --loss robust and --loss consistent)."""
    eps, steps = training_eps(args), args.attack_steps
    alpha = args.alpha or 2.5 * eps / steps
    if args.loss == "standard":
        return train.standard_loss
    if args.loss == "pgd" and args.recipe == "reference":
        return functools.partial(train.reference_adversarial_loss, eps=eps, steps=steps)
    if args.loss == "pgd":
        return functools.partial(train.pgd_adversarial_loss, eps=eps, alpha=alpha, steps=steps)
    if args.loss == "fast":
        return functools.partial(train.fast_fgsm_loss, eps=eps)
    if args.loss == "halfhalf":
        return functools.partial(_half_half, eps=eps, alpha=alpha, steps=steps)
    if args.loss == "robust":
        if input_shape is None:
            raise ValueError("--loss robust needs one sample's input_shape (for psi0 and the Lipschitz penalty)")
        return train.RobustLoss(
            attack=args.recipe,
            psi0=training_psi0(args, input_shape),
            eps=eps,
            alpha=alpha,
            steps=steps,
            zeta=args.zeta,
            lipschitz_weight=args.lipschitz_weight,
            model=model,
            input_shape=input_shape,
        )
    if args.loss == "consistent":
        if model is None:
            raise ValueError("--loss consistent needs the model (to find its layers)")
        layers = _csv(args.consistent_layers) if args.consistent_layers else [_last_linear(model)]
        names = dict(model.named_modules())
        bad = [name for name in layers if name not in names]
        if bad:
            raise common.UserError(
                f"--consistent-layers: no layer named {', '.join(bad)} in {args.arch}; layers: "
                + ", ".join(n for n in names if n)
            )
        return train.consistent_adversarial_loss(eps, alpha, steps, layers=layers, lam=args.consistent_lam)
    raise common.UserError(f"--loss {args.loss!r} is not known")


def _csv(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated list."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _last_linear(model: torch.nn.Module) -> str:
    """The name of ``model``'s last Linear layer (--loss consistent's default layer)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise common.UserError("--loss consistent: the model has no Linear layer; name layers with --consistent-layers")
    return linears[-1]


def _half_half(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, alpha: float, steps: int
) -> torch.Tensor:
    """--loss halfhalf: cross-entropy on the batch with half of it PGD-``steps`` images."""
    from pyadvk.attacks import PGD

    return train.half_half_loss(model, images, labels, attack=PGD(model, eps=eps, alpha=alpha, steps=steps))


LOSSES = ("standard", "pgd", "fast", "halfhalf", "robust", "consistent")
# The arguments a resumed run must share with its checkpoint (--epochs may grow; --out, --device,
# --restart and --override-settings say how to run, not what is trained).
SETTINGS = (
    "data",
    "arch",
    "activation",
    "loss",
    "zeta",
    "lipschitz_weight",
    "consistent_layers",
    "consistent_lam",
    "eps",
    "alpha",
    "attack_steps",
    "lr",
    "amp",
    "channels_last",
    "seed",
)


def run_settings(args: argparse.Namespace, input_shape: Sequence[int]) -> dict:
    """The settings a resume must match: SETTINGS with the budget resolved (so a changed default
    is seen), plus --recipe when not the default and psi0 for --loss robust."""
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["eps"] = training_eps(args)
    if args.recipe != "pyadvk":
        settings["recipe"] = args.recipe
    if args.loss == "robust":
        settings["psi0"] = training_psi0(args, input_shape)
    return settings


def run(args: argparse.Namespace) -> int:
    """Trains, writes OUT/model.pt, OUT/checkpoint.pt and OUT/history.json; returns 0."""
    common.check_output_dir("--out", args.out, ("model.pt", "checkpoint.pt", "history.json"))
    eps = training_eps(args)  # checked before any work
    device = common.device_from(args)
    loader, info = common.load_data(args, split="train", shuffle=True)
    test_loader, _ = common.load_data(args, split="test")
    kwargs = {**common.arch_kwargs(args.arch, info), "activation": args.activation}
    torch.manual_seed(args.seed)
    model = models.build(args.arch, **kwargs).to(device)
    common.check_model_on(model, loader, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = make_loss(args, model, tuple(info.image_shape))
    settings = run_settings(args, tuple(info.image_shape))
    if args.eps is None and args.loss != "standard":
        common.say(f"training attack budget: eps {eps:.6g} (the default for this data and recipe)")
    trainer = train.AdversarialTrainer(
        model,
        optimizer,
        loader,
        loss_fn=loss_fn,
        epochs=args.epochs,
        test_loader=test_loader,
        device=device,
        checkpoint_dir=args.out,
        resume=not args.restart,
        amp=args.amp,
        channels_last=args.channels_last,
        settings=settings,
        override_settings=args.override_settings,
    )
    if trainer.epoch:
        common.say(f"resuming from {trainer.checkpoint_path} after epoch {trainer.epoch}")
    history = trainer.fit()
    if distributed.is_main():
        models.save_model(model, os.path.join(args.out, "model.pt"), args.arch, **kwargs)
        save_json(
            {
                "args": {k: v for k, v in vars(args).items() if k != "run"},
                "settings": settings,
                "history": history,
                "world_size": distributed.world_size(),
            },
            os.path.join(args.out, "history.json"),
        )
    common.say(f"wrote {os.path.join(args.out, 'model.pt')}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``pyadvk train`` and its arguments."""
    p = sub.add_parser(
        "train",
        help="train a model with an adversarial-training loss",
        description="Trains --arch on --data with --loss; writes OUT/model.pt (load it with "
        "the other commands' --model), OUT/checkpoint.pt (resumed automatically) "
        "and OUT/history.json. Runs unchanged under torchrun --nproc_per_node=N "
        "(DistributedDataParallel, one data shard per rank).",
    )
    common.add_data_args(p, default="digits")
    common.add_device_arg(p)
    p.add_argument("--arch", default="small_cnn", choices=sorted(models.ARCHITECTURES))
    p.add_argument("--activation", default="relu", choices=("relu", "half_huber"))
    p.add_argument(
        "--loss",
        default="pgd",
        choices=LOSSES,
        help="training loss (default pgd): standard; pgd (Madry); fast (FGSM with random start); "
        "halfhalf (half of each batch PGD); robust (Woods et al. 2019: half-half PGD + "
        "input-gradient penalty with adaptive psi, best with --activation half_huber); "
        "consistent (Dong et al. 2017: PGD + feature-consistency term)",
    )
    p.add_argument("--zeta", type=float, default=0.2, help="--loss robust: margin probability of the penalty")
    p.add_argument(
        "--lipschitz-weight",
        type=float,
        default=0.0,
        help="--loss robust: weight of a Lipschitz (spectral-norm hinge) penalty (default 0: none)",
    )
    p.add_argument(
        "--consistent-layers",
        default=None,
        metavar="NAMES",
        help="--loss consistent: comma-separated layer names (default: the last Linear layer)",
    )
    p.add_argument("--consistent-lam", type=float, default=1.0, help="--loss consistent: weight λ")
    p.add_argument(
        "--recipe",
        default="pyadvk",
        choices=RECIPES,
        help="pyadvk (default): L∞ PGD with random start (--loss robust: on exactly half of each batch); "
        "reference: the paper's reference code (Woods et al. 2019): --loss pgd trains on L2 examples "
        "in RMS units (eps 0.01, 7 decaying steps, zero start, no clipping), --loss robust on L2,min "
        "examples (eps 0.1) of a Bernoulli(0.5) half of each batch",
    )
    p.add_argument(
        "--psi0",
        type=float,
        default=None,
        help="--loss robust: starting weight psi0 of the input-gradient penalty (default 220·D/3072 for "
        "inputs of D values: the paper's 220 on CIFAR, 18.3 on 16×16 digits; the penalty is a mean "
        "over the D values, so psi0 scales with D)",
    )
    p.add_argument(
        "--eps",
        default=None,
        help="budget of the training attack, a number or a fraction like 8/255 (default: 0.1 on "
        "digits, 8/255 on cifar10, required for folder data; with --recipe reference the RMS budget "
        "0.01 for --loss pgd, 0.1 for --loss robust)",
    )
    p.add_argument("--alpha", type=float, default=None, help="attack step (default 2.5·eps/steps)")
    p.add_argument(
        "--attack-steps", type=common.positive_int, default=7, help="PGD steps of the training attack (default 7)"
    )
    p.add_argument("--epochs", type=common.positive_int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="mixed precision")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT")
    p.add_argument(
        "--override-settings",
        action="store_true",
        help="resume a checkpoint written with other settings (e.g. --lr, --loss), continuing from its "
        "weights with the new ones (by default such a resume is refused, listing the differences)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(run=run)
