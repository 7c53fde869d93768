"""Distributed training glue: one code path for a single process and for ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; when WORLD_SIZE > 1 the process group is
initialised (NCCL on CUDA, gloo on CPU) and the model is wrapped in DistributedDataParallel.
Multi-node runs need nothing more than torchrun's own flags (--nnodes, --node-rank,
--rdzv-endpoint). Only rank 0 writes logs and checkpoints; evaluation results are gathered from
all ranks so every rank sees the same metrics (and takes the same early-stopping decision).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_environment() -> DistributedContext:
    """Read torchrun's variables (absent = a single process)."""
    return DistributedContext(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun prepared (if any) and return where this process stands."""
    ctx = context_from_environment()
    if not ctx.enabled:
        return ctx
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    ctx.backend = backend
    return ctx


def device_for(requested: str, ctx: DistributedContext) -> torch.device:
    """``auto`` = this rank's GPU when CUDA is available, else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu")
        if requested == "cuda":
            requested = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(torch.device(requested))
    elif requested != "cpu":
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(requested)


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's ``obj`` (picklable plain data), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: float, ctx: DistributedContext) -> float:
    if not ctx.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def shutdown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
