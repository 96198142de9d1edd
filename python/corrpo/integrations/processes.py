"""The process group the trainers run under (DDP, FSDP2, ZeRO-3: one process per device), for
the integrations that gather across it."""

from __future__ import annotations

from typing import Any


def world() -> tuple[int, int]:
    """(rank, size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gathered(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out
