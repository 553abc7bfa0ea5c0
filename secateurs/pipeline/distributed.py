"""Calibration spread over several processes (torchrun): gloo on CPU, NCCL on GPUs.

Each process runs its shard of the calibration samples through the block. The Hessian sums and
token counts are all-reduced, so every process then holds the statistics of all samples. The
layers of the block are split across the processes, balanced by estimated cost; each compressed
weight is broadcast from the process that computed it. With one process every step is a no-op,
so the engine runs the same code either way.

    torchrun --nproc-per-node 4 -m secateurs.cli compress --model DIR --stream --output OUT
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from secateurs.errors import SecateursError
from secateurs.algorithms.hessian import HessianAccumulator

OBS_METHODS = ("sparsegpt", "gptq")  # column sweeps over an inverse Hessian factor


def check_device(device: str | None) -> None:
    """One line, before any work, for a device torch does not know or this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SecateursError(f"--device {device}: not a device (expected cpu, cuda, cuda:N, ...)") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", lambda: False)()
    if not available:
        raise SecateursError(f"--device {device}: this machine has no {parsed.type} device (torch sees none)")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise SecateursError(f"--device {device}: this machine has {count} {parsed.type} device(s)")


def init_from_environment(device: str | None) -> str | None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns this process's
    compute device (its own GPU under NCCL)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device


def leave_process_group() -> None:
    """After a successful run under torchrun: wait for every process, then close the group. A gloo
    group left open can abort a process at interpreter exit, after its work is written."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def layer_cost(rows: int, columns: int, methods: list[str]) -> float:
    """Rough FLOPs to compress one layer: an OBS sweep costs ~rows·columns² plus ~columns³ to
    factor the inverse Hessian; masks and rounding alone cost ~rows·columns."""
    if any(method in OBS_METHODS for method in methods):
        return float(rows * columns**2 + columns**3)
    return float(rows * columns)


def balance(costs: dict[str, float], workers: int) -> dict[str, int]:
    """Longest job first onto the least-loaded worker (ties to the lowest worker and name order,
    so every process computes the same assignment)."""
    loads = [0.0] * workers
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        worker = min(range(workers), key=lambda w: (loads[w], w))
        owners[name] = worker
        loads[worker] += costs[name]
    return owners


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> ProcessGroup:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, calibration: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the calibration samples."""
        if self.world_size == 1:
            return calibration
        if calibration.shape[0] < self.world_size:
            raise SecateursError(f"{calibration.shape[0]} calibration samples cannot be shared by {self.world_size} processes")
        return torch.tensor_split(calibration, self.world_size)[self.rank]

    def all_reduce(self, accumulators: list[HessianAccumulator]) -> None:
        if self.world_size == 1:
            return
        for accumulator in accumulators:
            dist.all_reduce(accumulator.sum)
            count = torch.tensor([accumulator.count], dtype=torch.int64, device=accumulator.sum.device)
            dist.all_reduce(count)
            accumulator.count = int(count.item())

    def assign(self, costs: dict[str, float]) -> dict[str, int]:
        return balance(costs, self.world_size)

    def share(self, owner: int, weight: torch.Tensor, payload):
        """Broadcast a compressed weight in place, and a small picklable payload, from `owner`."""
        if self.world_size == 1:
            return payload
        dist.broadcast(weight, src=owner)
        box = [payload]
        dist.broadcast_object_list(box, src=owner)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
