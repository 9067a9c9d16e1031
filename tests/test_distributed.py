"""torch.distributed: 2 processes with gloo on loopback give the same results as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyadvk import distributed, metrics, train
from pyadvk.attacks import PGD

WORLD = 2


def _data(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def _spawn(fn, tmp_path, *args):
    mp.spawn(_worker, args=(fn, str(tmp_path), args), nprocs=WORLD, join=True)


def _worker(rank, fn, tmp, args):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        fn(rank, tmp, *args)
    finally:
        dist.destroy_process_group()


def test_shard_sampler_partitions_without_padding():
    for n in (0, 1, 7, 10):
        for shuffle in (False, True):
            parts = [list(distributed.ShardSampler(n, shuffle=shuffle, seed=3, rank_=r, world=3)) for r in range(3)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n))
            assert [len(p) for p in parts] == [len(distributed.ShardSampler(n, rank_=r, world=3)) for r in range(3)]


def _metrics_rank(rank, tmp):
    model = _model().eval()
    loader = distributed.shard_loader(_data(), batch_size=5, n=31)
    acc = metrics.robust_accuracy(
        model, loader, PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False), progress=False
    )
    result = metrics.ara(model, loader, n=None, steps=40, budget=2.0, progress=False)
    curve = metrics.robustness_curve(model, loader, [0.0, 0.1], steps=2, progress=False)
    if rank == 0:
        torch.save(
            {"acc": acc, "distances": result.distances, "ara": result.ara, "curve": curve.accuracy}, f"{tmp}/out.pt"
        )


def test_sharded_metrics_equal_one_process(tmp_path):
    _spawn(_metrics_rank, tmp_path)
    got = torch.load(tmp_path / "out.pt")
    model = _model().eval()
    ds = torch.utils.data.Subset(_data(), range(31))
    loader = DataLoader(ds, batch_size=5)
    acc = metrics.robust_accuracy(
        model, loader, PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False), progress=False
    )
    result = metrics.ara(model, loader, n=None, steps=40, budget=2.0, progress=False)
    assert got["acc"] == acc
    assert got["distances"].numel() == 31  # no sample lost or counted twice
    torch.testing.assert_close(got["distances"].sort().values, result.distances.sort().values, rtol=0, atol=1e-6)
    assert got["ara"] == pytest.approx(result.ara, abs=1e-9)
    assert got["curve"][0] == metrics.robust_accuracy(model, loader, None, progress=False)


def _pgd_fixed_start(model, images, labels):
    adv = PGD(distributed.unwrap(model), eps=0.1, alpha=0.03, steps=2, random_start=False)(images, labels)
    return nn.functional.cross_entropy(model(adv), labels)


def _train_rank(rank, tmp):
    model = _model()
    loader = distributed.shard_loader(_data(n=32), batch_size=4, shuffle=True, seed=1)
    trainer = train.AdversarialTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        loss_fn=_pgd_fixed_start,
        epochs=2,
        checkpoint_dir=tmp,
        progress=False,
    )
    assert isinstance(trainer.model, nn.parallel.DistributedDataParallel)
    trainer.fit()
    weights = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(WORLD)]
    dist.all_gather(gathered, weights)
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    if rank == 0:
        torch.save(weights, f"{tmp}/weights.pt")


def test_ddp_training_equals_one_process_on_the_union_batches(tmp_path):
    """With an attack that has no random start, 2 ranks × batch 4 equal 1 process × batch 8 on the
    same batches (mean losses, averaged gradients)."""
    _spawn(_train_rank, tmp_path)
    ddp_weights = torch.load(tmp_path / "weights.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "rendezvous", "weights.pt"] or sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["checkpoint.pt", "weights.pt"]
    model = _model()
    sampler = distributed.ShardSampler(32, shuffle=True, seed=1, rank_=0, world=1)
    loader = DataLoader(_data(n=32), batch_size=8, sampler=sampler)
    train.AdversarialTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loss_fn=_pgd_fixed_start, epochs=2, progress=False
    ).fit()
    single = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(ddp_weights, single, rtol=0, atol=1e-5)
    # The checkpoint records its world size: resuming it in one process is refused clearly.
    model = _model()
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) but this run has 1"):
        train.AdversarialTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, checkpoint_dir=str(tmp_path), progress=False
        )


def _padding_sampler_rank(rank, tmp):
    ds = _data(n=5)
    loader = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, shuffle=False))
    try:
        metrics.robust_accuracy(_model(), loader, None, progress=False)
    except ValueError as exc:
        assert "use pyadvk.distributed.shard_loader" in str(exc)
        if rank == 0:
            open(f"{tmp}/refused", "w").close()


def test_padding_distributed_sampler_is_refused(tmp_path):
    _spawn(_padding_sampler_rank, tmp_path)
    assert (tmp_path / "refused").exists()


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(tmp_path):
    """`pyadvk ara` runs unchanged under torchrun; the numbers equal a single process's."""
    model = tmp_path / "m"
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pyadvk",
                "train",
                "--data",
                "digits:8",
                "--loss",
                "standard",
                "--epochs",
                "1",
                "--out",
                str(model),
            ],
            capture_output=True,
            timeout=600,
        ).returncode
        == 0
    )
    args = [
        "ara",
        "--model",
        str(model / "model.pt"),
        "--data",
        "digits:8",
        "--num-images",
        "25",
        "--steps",
        "30",
        "--criterion",
        "misclassify",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    one = subprocess.run([sys.executable, "-m", "pyadvk", *args], capture_output=True, text=True, env=env, timeout=600)
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            "-m",
            "pyadvk",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    line = [ln for ln in one.stdout.splitlines() if ln.startswith("misclassify-ARA")]
    assert line and [ln for ln in two.stdout.splitlines() if ln.startswith("misclassify-ARA")] == line
