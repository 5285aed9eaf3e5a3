"""Data-parallel training under ``torchrun``: which process this is, and what it may do.

``torchrun --nproc_per_node N -m anomaly.ablation …`` starts N copies of the command with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each copy joins one process group (gloo on a
CPU, NCCL on GPUs), trains on its ``1/N`` share of every global batch with PyTorch DDP,
and only rank 0 touches the output folder (config, checkpoints, evaluation, results,
figures); the other ranks load what rank 0 wrote when they resume. A plain
``python -m anomaly.ablation`` is a world of one and uses none of this.

Values left in the environment without torchrun (a ``WORLD_SIZE`` exported by hand, a
``RANK`` without a ``WORLD_SIZE``, a rank outside the world) are refused in one line
before anything is written, instead of waiting for processes that never come.

A refusal under torchrun (:func:`refuse_under_torchrun`): torchrun prints its own report,
with a Python traceback of the launcher, whenever a worker exits non-zero, and nothing
a worker does can change that (``torch.distributed.run`` re-raises ``ChildFailedError``).
So that the report is at least about the refusal: rank 0 prints the one line and records
it in torchrun's error file (the report's "Root Cause" then shows the line instead of "To
enable traceback see …"), and the other ranks stay silent for up to 30 s, so that rank 0
is the failure torchrun reports first and the line is printed once (on a busy machine
the ranks reach the check seconds apart, hence the generous wait).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
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


_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
_UNSET = "unset WORLD_SIZE, RANK and LOCAL_RANK (left from an earlier torchrun?) or start the command with torchrun"


def under_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def world_from_env() -> World:
    """The :class:`World` torchrun describes in the environment (a world of one otherwise).

    Raises:
        UserError: values that are not whole numbers, a rank outside the world, a rank
            without a world size, or a world of several processes that torchrun did not
            start (no ``MASTER_ADDR``/``MASTER_PORT``: joining would wait forever).
    """
    values: dict[str, int] = {}
    for name in _ENV:
        text = os.environ.get(name)
        if text is None or text.strip() == "":
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise UserError(f"{name}={text!r} in the environment is not a whole number; {_UNSET}") from None
    if "WORLD_SIZE" not in values:
        if not any(values.values()):
            return World()  # RANK=0 or LOCAL_RANK=0 alone: a world of one either way
        set_ = ", ".join(f"{k}={v}" for k, v in values.items())
        raise UserError(f"{set_} is set in the environment but WORLD_SIZE is not; {_UNSET}")
    size, rank, local = values["WORLD_SIZE"], values.get("RANK", 0), values.get("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size or not 0 <= local < size:
        raise UserError(f"WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local} in the environment do not fit together "
                        f"(each rank lies in 0 … WORLD_SIZE−1); {_UNSET}")
    if size > 1 and not under_torchrun() and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise UserError(f"WORLD_SIZE={size} is set in the environment, but this process was not started by torchrun "
                        "(no MASTER_ADDR/MASTER_PORT), so the other processes would never come; "
                        f"{_UNSET}, e.g. torchrun --nproc_per_node {size} -m anomaly.ablation …")
    return World(rank=rank, size=size, local_rank=local)


SILENT_RANK_WAIT_S = 30.0
"""How long a rank other than 0 waits, after a refusal under torchrun, for rank 0 to be
the one that reports it (torchrun stops the others once one worker has failed)."""


def refuse_under_torchrun(message: str) -> None:
    """Prepare the report of a refusal (a :class:`UserError`'s message) under torchrun,
    before the caller prints it and exits with status 2.

    Rank 0 records the line in torchrun's error file. Another rank first waits up to
    :data:`SILENT_RANK_WAIT_S`: torchrun ends it once rank 0 has failed, so it prints the
    line only when rank 0 did not refuse.
    """
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path:
            try:
                with open(path, "w") as f:
                    # torchrun's own format (ErrorHandler.record_exception); its report shows
                    # "py_callstack" as the failure's traceback: here, the one line.
                    line = f"error: {message}"
                    json.dump({"message": {"message": line, "extraInfo": {
                        "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
            except OSError:
                pass  # torchrun's report falls back to its generic line
        return
    sys.stderr.flush()
    time.sleep(SILENT_RANK_WAIT_S)


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
