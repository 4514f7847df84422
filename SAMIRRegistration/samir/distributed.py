"""Several processes (GPUs, nodes) working on one job, started by ``torchrun``.

``torchrun --nproc_per_node=N samir train CONFIG`` (or ``samir register-batch``) starts N copies
with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_distributed` joins them into one process group (NCCL on CUDA, Gloo on CPU) and picks
``cuda:LOCAL_RANK``. Without these variables everything runs in this one process. Rank 0 writes
logs, checkpoints and summaries; the others only compute.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .geometry import SAMIRInputError
from .resources import resolve_device

T = TypeVar("T")
ENV_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    owns_group: bool = False  # this context created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place; also returned). The tensor lives on ``device``."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(tensor, src=source)
        return tensor

    def shard(self, items: Sequence[T]) -> List[T]:
        """This rank's share of ``items``: every ``world_size``-th item, starting at ``rank``."""
        return list(items[self.rank::self.world_size])


def environment_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise SAMIRInputError(f"WORLD_SIZE must be an integer, got '{value}'") from None


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistributedContext:
    """The context of this process: single-process, or a member of the ``torchrun`` process group."""
    world = environment_world_size()
    if world <= 1:
        return DistributedContext(device=resolve_device(device))
    missing = [name for name in ENV_VARIABLES if name not in os.environ]
    if missing:
        raise SAMIRInputError(f"WORLD_SIZE = {world} but {', '.join(missing)} not set: start the job with torchrun"
                              " (torchrun --nproc_per_node=N samir ...)")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SAMIRInputError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at"
                                  " most one process per GPU")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    elif device in ("auto", "cpu"):
        resolved = torch.device("cpu")
    else:
        resolved = resolve_device(device)
    backend = backend or ("nccl" if resolved.type == "cuda" else "gloo")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
        owns = True
    return DistributedContext(rank, world, local_rank, resolved, backend, owns)


def shutdown_distributed(context: DistributedContext) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()
