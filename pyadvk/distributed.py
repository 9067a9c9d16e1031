"""Scaling out on torch.distributed: process groups from torchrun's environment, exact data
sharding, gathers, and rank-0-only output.

Every pyadvk function that aggregates over a dataset (the metrics, :class:`pyadvk.stats.NeuronStats`,
the trainer) checks :func:`is_distributed` and, when a process group is up, combines the ranks'
partial results exactly: the same numbers as one process on the same data. The data must then be
split without duplicates; :func:`shard_loader` does that (torch's ``DistributedSampler`` pads the
last round with repeated samples, which would count them twice).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_is_up() -> bool:
    """Whether a default process group exists (of any size, one included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Starts the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), if there is one and it is not started yet.
    Backend: NCCL when CUDA is available, else gloo. Returns whether running distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return is_distributed()


def shutdown() -> None:
    """Destroys the default process group, if one is up. A process that started it with
    :func:`init_from_env` calls this before exiting: a gloo group left alive at interpreter exit
    can abort the process ("terminate called without an active exception") after its work is done."""
    if group_is_up():
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (attacks run on it, so their
    input-gradient passes start no gradient all-reduce)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class ShardSampler(Sampler[int]):
    """The indices ``rank, rank + W, rank + 2W, …`` of the first ``n`` items (W = world size),
    optionally in a seeded per-epoch permutation shared by all ranks: every item goes to exactly
    one rank, none is repeated, so per-rank counts may differ by one."""

    def __init__(
        self, n: int, *, shuffle: bool = False, seed: int = 0, rank_: int | None = None, world: int | None = None
    ) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def shard_loader(
    dataset: Dataset, batch_size: int, *, n: int | None = None, shuffle: bool = False, seed: int = 0, **kwargs: Any
) -> DataLoader:
    """A DataLoader over this rank's share of the first ``n`` items (all by default) of a map-style
    ``dataset`` (one with a len())."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must be a map-style Dataset with a len(), got {type(dataset).__name__}")
    total = len(dataset) if n is None else min(n, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(total, shuffle=shuffle, seed=seed), **kwargs)


def check_loader(loader: DataLoader) -> None:
    """Rejects a padding DistributedSampler, whose repeated samples would be counted twice."""
    sampler = getattr(loader, "sampler", None)
    if is_distributed() and isinstance(sampler, DistributedSampler):
        assert isinstance(sampler.dataset, Sized)  # DistributedSampler took its len()
        size = len(sampler.dataset)
        if size % sampler.num_replicas and not sampler.drop_last:
            raise ValueError(
                f"the loader's DistributedSampler pads {size} items to a multiple of {sampler.num_replicas} "
                "ranks by repeating some, which would count them twice; use pyadvk.distributed.shard_loader"
            )


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenates each rank's tensor along dim 0, in rank order (first dims may differ)."""
    if not is_distributed():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = t.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros((longest,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a vector of numbers (float64), on every rank."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if is_distributed():
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``t`` over ranks (a no-op without a process group)."""
    if is_distributed():
        dist.all_reduce(t)
        t.div_(world_size())
    return t


def check_world_size(saved: int | None, what: str) -> None:
    """Resuming state written by ``saved`` processes needs the same number of processes."""
    if saved is not None and saved != world_size():
        raise ValueError(
            f"{what} was written by {saved} process(es) but this run has {world_size()}: resume with "
            f"torchrun --nproc_per_node={saved} (the data shards and RNG streams depend on it)"
        )
