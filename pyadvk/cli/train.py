"""``pyadvk train``: train a named architecture with one of pyadvk's losses; writes a pyadvk
model file, a resumable checkpoint and the history (all atomically)."""

from __future__ import annotations

import functools
import os

import torch

from pyadvk import distributed, models, train
from pyadvk._io import save_json
from pyadvk.cli import common


def make_loss(args, model=None, input_shape=None):
    """The training loss named by --loss, with the budget arguments (``model`` and one sample's
    ``input_shape`` are needed by --loss robust with --lipschitz-weight and --loss consistent)."""
    eps, steps = args.eps, args.attack_steps
    alpha = args.alpha or 2.5 * eps / steps
    if args.loss == "standard":
        return train.standard_loss
    if args.loss == "pgd":
        return functools.partial(train.pgd_adversarial_loss, eps=eps, alpha=alpha, steps=steps)
    if args.loss == "fast":
        return functools.partial(train.fast_fgsm_loss, eps=eps)
    if args.loss == "halfhalf":
        return functools.partial(_half_half, eps=eps, alpha=alpha, steps=steps)
    if args.loss == "robust":
        return train.RobustLoss(
            eps=eps,
            alpha=alpha,
            steps=steps,
            zeta=args.zeta,
            lipschitz_weight=args.lipschitz_weight,
            model=model,
            input_shape=input_shape,
        )
    if args.loss == "consistent":
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
    return [v.strip() for v in text.split(",") if v.strip()]


def _last_linear(model) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise common.UserError("--loss consistent: the model has no Linear layer; name layers with --consistent-layers")
    return linears[-1]


def _half_half(model, images, labels, *, eps, alpha, steps):
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


def run(args) -> int:
    common.check_output_dir("--out", args.out, ("model.pt", "checkpoint.pt", "history.json"))
    device = common.device_from(args)
    loader, info = common.load_data(args, split="train", shuffle=True)
    test_loader, _ = common.load_data(args, split="test")
    kwargs = {**common.arch_kwargs(args.arch, info), "activation": args.activation}
    torch.manual_seed(args.seed)
    model = models.build(args.arch, **kwargs).to(device)
    common.check_model_on(model, loader, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    trainer = train.AdversarialTrainer(
        model,
        optimizer,
        loader,
        loss_fn=make_loss(args, model, tuple(info.image_shape)),
        epochs=args.epochs,
        test_loader=test_loader,
        device=device,
        checkpoint_dir=args.out,
        resume=not args.restart,
        amp=args.amp,
        channels_last=args.channels_last,
        settings={k: getattr(args, k) for k in SETTINGS},
        override_settings=args.override_settings,
    )
    if trainer.epoch:
        common.say(f"resuming from {trainer.checkpoint_path} after epoch {trainer.epoch}")
    history = trainer.fit()
    for h in history:
        common.say(
            f"epoch {h['epoch']}: loss {h['train_loss']:.4f}, "
            f"test accuracy {h.get('test_accuracy', float('nan')):.4f}, {h['seconds']:.1f} s"
        )
    if distributed.is_main():
        models.save_model(model, os.path.join(args.out, "model.pt"), args.arch, **kwargs)
        save_json(
            {
                "args": {k: v for k, v in vars(args).items() if k != "run"},
                "history": history,
                "world_size": distributed.world_size(),
            },
            os.path.join(args.out, "history.json"),
        )
    common.say(f"wrote {os.path.join(args.out, 'model.pt')}")
    return 0


def add_parser(sub) -> None:
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
    p.add_argument("--eps", type=float, default=8 / 255, help="L∞ budget of the training attack")
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
