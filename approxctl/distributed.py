"""Data-parallel training through ``torchrun`` (torch.distributed DDP; gloo on CPU).

``torchrun --nproc_per_node 2 -m approxctl train ...`` starts one process per rank; each reads
the same command line. ``context()`` joins the process group when ``WORLD_SIZE`` > 1. The global
batch (``--batch-size``) is split evenly across ranks; only rank 0 validates and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from approxctl.errors import ApproxError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context(device: torch.device) -> DistContext:
    """The process group of this ``torchrun`` process (or a single-process context)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def shard_loader(loader: DataLoader, ctx: DistContext, seed: int) -> DataLoader:
    """The training loader of this rank: a disjoint 1/world of each epoch, batch / world."""
    batch = loader.batch_size or 1
    if batch % ctx.world:
        raise ApproxError(f"--batch-size {batch} does not split evenly over {ctx.world} processes")
    sampler = DistributedSampler(
        loader.dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed,
        drop_last=True,
    )  # fmt: skip
    return DataLoader(
        loader.dataset, batch_size=batch // ctx.world, sampler=sampler,
        collate_fn=loader.collate_fn, num_workers=loader.num_workers,
    )  # fmt: skip


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP around ``model``; buffers (activation scales, error models, BatchNorm statistics)
    follow rank 0's at every forward, so every rank injects the same fitted error model."""
    if not ctx.enabled:
        return model
    ids = [ctx.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)


def share(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a validation result only rank 0 computed)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
