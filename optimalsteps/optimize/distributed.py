"""Data-parallel search on torch.distributed: each rank takes a contiguous share of the samples.

Launched with `torchrun` (or `accelerate launch`), the default process group is used; every helper here
is the identity in a single process, so the search code calls them unconditionally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import OptimalStepsError


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    start: int  # first global sample index of this rank
    stop: int
    total: int  # samples over all ranks

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def shard(total: int, enabled: bool = True) -> Shard:
    """This rank's contiguous block of `total` samples (blocks differ in size by at most one)."""
    if not (enabled and is_distributed()):
        return Shard(0, 1, 0, total, total)
    world, r = dist.get_world_size(), dist.get_rank()
    if total < world:
        raise OptimalStepsError(f"{total} samples cannot be shared by {world} ranks: use at least one per rank")
    base, extra = divmod(total, world)
    start = r * base + min(r, extra)
    return Shard(r, world, start, start + base + (1 if r < extra else 0), total)


def all_reduce_sum(tensor: torch.Tensor, part: Shard) -> torch.Tensor:
    """The sum over ranks (in place on a copy); identity in a single process."""
    if not part.active:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(value: Any, part: Shard) -> list[Any]:
    """Every rank's value, in rank order."""
    if not part.active:
        return [value]
    out: list[Any] = [None] * part.world
    dist.all_gather_object(out, value)
    return out


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
