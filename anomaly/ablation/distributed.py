"""Data-parallel training under ``torchrun``: which process this is, and what it may do.

``torchrun --nproc_per_node N -m anomaly.ablation …`` starts N copies of the command with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each copy joins one process group (gloo on a
CPU, NCCL on GPUs), trains on its ``1/N`` share of every global batch with PyTorch DDP,
and only rank 0 touches the output folder (config, checkpoints, evaluation, results,
figures); the other ranks load what rank 0 wrote when they resume. A plain
``python -m anomaly.ablation`` is a world of one and uses none of this.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from anomaly.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    """0 … ``size − 1``; rank 0 writes every output."""
    size: int = 1
    """Number of processes sharing each batch."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a world of one)."""
        if self.distributed:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """Mean of ``value`` over the ranks (``value`` itself in a world of one)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any rank (so every rank stops together)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t)
        return bool(t.item())

    def check_split(self, batch_size: int) -> None:
        """Refuse a global batch that does not split evenly over the processes.

        Raises:
            UserError: ``batch_size`` is not a multiple of ``size``.
        """
        if batch_size % self.size:
            raise UserError(f"the batch of {batch_size} sequences does not split over {self.size} processes; "
                            f"use a --nproc_per_node that divides {batch_size}")

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` sequences."""
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def world_from_env() -> World:
    """The :class:`World` torchrun describes in the environment (a world of one otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def join(world: World, device: torch.device, batch_size: int) -> torch.device:
    """Join the process group of ``world`` and return this rank's device.

    Raises:
        UserError: the global batch does not split evenly over the processes.
    """
    if not world.distributed:
        return device
    world.check_split(batch_size)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))  # rank 0 evaluates alone
    return device


def leave(world: World) -> None:
    """Leave the process group (after the last collective call)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
