"""Process group set-up from torchrun's environment, and the few collectives the trainer needs.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) every function is a cheap no-op, so single
process training never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_cpu_group: dist.ProcessGroup | None = None  # None: the default group, when it is gloo itself


@dataclass(frozen=True)
class DistributedSetup:
    rank: int
    world_size: int
    device: str


def setup(device: str) -> DistributedSetup:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs), one device per process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedSetup(rank=0, world_size=1, device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    global _cpu_group
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    # flags and small Python objects (stop flag after every update, RNG states) go over the CPU,
    # without GPU copies or synchronization
    _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistributedSetup(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: all ranks stop at the same update after a signal.

    Runs on a CPU (gloo) group, so calling it after every update costs no GPU synchronization.
    """
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(tensor.item())


def value_of_main(value: float) -> float:
    """Rank 0's `value` on every rank (over the CPU group: no GPU synchronization)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(tensor, src=0, group=_cpu_group)
    return float(tensor.item())


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (the tensor itself without torchrun)."""
    if not is_distributed():
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. a generated run id)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=_cpu_group)
    return holder[0]


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value, group=_cpu_group)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if is_distributed() else 0
