"""Processes and devices: one process, or data parallel under torchrun (DDP, or FSDP2 sharding).

Falcon Mamba was trained with data parallelism only (ZeRO-sharded optimizer state), which is what
DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) give here. Under ``torchrun`` the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from falcon_mamba.errors import UserError


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # setup() started the process group, so teardown() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Env:
    """Start the process group when launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda was asked for but no CUDA GPU is available; use --set device=cpu")
        # set_device needs an index; a plain "cuda" means this process's local GPU.
        dev = torch.device("cuda", local if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Env(rank, world, dev, owns)


def teardown(env: Env) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_modules(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: the modules a forward pass calls as a whole. For
    FalconMamba those are the mixers (the block norms are called apart from their block)."""
    units = [m for name, m in model.named_modules() if name.endswith(".mixer")]
    if not units:  # another architecture (the benchmark's Transformer): its blocks
        units = list(getattr(model, "shard_units", lambda: [])())
    return units


def wrap(module: nn.Module, inner: nn.Module, parallel: str, env: Env) -> nn.Module:
    """Wrap the training module for data parallelism (a no-op with one process)."""
    if not env.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for unit in shard_modules(inner):
        fully_shard(unit)
    fully_shard(module)
    return module


def set_grad_sync(module: nn.Module, sync: bool):
    """A context for one micro-batch: skip the gradient all-reduce except on the last one."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP) and not sync:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
