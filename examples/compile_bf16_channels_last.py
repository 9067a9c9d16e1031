"""PGD adversarial training in a plain loop with torch.compile, bf16 autocast and channels_last.

The attack composes with all three: it runs the compiled model (its input-gradient backward is
compiled too), under bf16 autocast (``PGD(..., autocast=torch.bfloat16)``: forward and backward in
bf16, the fused step in float32), on channels_last images (``channels_last=True``: the adversarial
images keep the layout). The script trains SmallCNN on the digits, then checks on the test split
that the adversarial images lie in the L∞ ball and the [0, 1] box and keep channels_last, and
prints the robust accuracy measured three ways: compiled + bf16 + channels_last, eager + bf16, and
eager in float32 (they differ by bf16 rounding only).

    python examples/compile_bf16_channels_last.py                  # digits 16×16, 3 epochs
    python examples/compile_bf16_channels_last.py --size 8 --epochs 1 --max-train-images 128 --max-images 32 \
        --backend aot_eager                                         # a smoke run (the test's)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from pyadvk.attacks import PGD
from pyadvk.data import digits
from pyadvk.metrics import robust_accuracy
from pyadvk.models import SmallCNN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=16, choices=(8, 16, 32), help="digits image size (default 16)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=0.1, help="L∞ budget (default 0.1)")
    p.add_argument("--steps", type=int, default=5, help="PGD steps (default 5)")
    p.add_argument("--max-images", type=int, default=None, help="test images to attack (default all)")
    p.add_argument("--max-train-images", type=int, default=None, help="training images (default all)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Trains and evaluates; returns the measured numbers (also printed)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = SmallCNN(in_channels=1, input_size=args.size, width=16).to(device).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend=args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_set = digits(args.size, "train")
    if args.max_train_images is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(args.max_train_images, len(train_set))))
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    alpha = 2.5 * args.eps / args.steps

    def attack_for(net: torch.nn.Module, bf16: bool, channels_last: bool) -> PGD:
        return PGD(
            net,
            eps=args.eps,
            alpha=alpha,
            steps=args.steps,
            autocast=torch.bfloat16 if bf16 else None,
            channels_last=channels_last,
            generator=torch.Generator(device=device).manual_seed(args.seed),
        )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        total = count = 0.0
        for images, labels in train_loader:
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            compiled.train()
            adv = attack_for(compiled, True, True)(images, labels)  # in train mode, as Madry et al.
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(compiled(adv).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        print(f"epoch {epoch + 1}: adversarial loss {total / count:.4f}")
    train_seconds = time.perf_counter() - start

    compiled.eval()
    test_set = digits(args.size, "test")
    n = len(test_set) if args.max_images is None else min(args.max_images, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(n)]).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.stack([test_set[i][1] for i in range(n)]).to(device)
    adv = attack_for(compiled, True, True)(images, labels)
    distance = float((adv - images).abs().max())
    if distance > args.eps + 1e-6 or float(adv.min()) < 0.0 or float(adv.max()) > 1.0:
        raise AssertionError(f"adversarial images left the ball or the box: L∞ distance {distance}")
    if not adv.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("the adversarial images lost the channels_last layout")
    loader = DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=args.batch_size)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        compiled_bf16 = robust_accuracy(compiled, loader, attack_for(compiled, True, True), progress=False)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager_bf16 = robust_accuracy(model, loader, attack_for(model, True, False), progress=False)
    eager_fp32 = robust_accuracy(model, loader, attack_for(model, False, False), progress=False)
    clean = robust_accuracy(model, loader, None, progress=False)
    result = {
        "clean_accuracy": clean,
        "robust_accuracy_compiled_bf16_channels_last": compiled_bf16,
        "robust_accuracy_eager_bf16": eager_bf16,
        "robust_accuracy_eager_fp32": eager_fp32,
        "max_linf_distance": distance,
        "train_seconds": train_seconds,
    }
    print(
        f"{n} test images, L∞ eps {args.eps}: clean {clean:.3f}; PGD-{args.steps} robust accuracy: compiled + bf16 + "
        f"channels_last {compiled_bf16:.3f}, eager bf16 {eager_bf16:.3f}, eager fp32 {eager_fp32:.3f}; "
        f"max |adv - x| = {distance:.4f}; training {train_seconds:.1f} s"
    )
    return result


if __name__ == "__main__":
    main()
