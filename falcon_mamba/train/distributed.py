"""Processes and devices: one process, or data parallel under torchrun (DDP, or FSDP2 sharding).

Falcon Mamba was trained with data parallelism only (ZeRO-sharded optimizer state), which is what
DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) give here. Under ``torchrun`` the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read; gloo on CPU, NCCL on CUDA
(each process on GPU LOCAL_RANK of its node; NCCL's own environment, e.g. NCCL_NVLS_ENABLE, is left
as the machine sets it).

Mixed precision (precision=bf16): the weights, gradients and AdamW states stay fp32 (master
copies) and the compute runs under bf16 autocast, with DDP and FSDP2 alike. FSDP2 also all-gathers
the mixers' in_proj and out_proj (89% of the 7B's weights) in bf16, their own units with
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the same rounding autocast does, on
half the bytes. The rest (A_log, D, the dt bias, conv, x_proj, norms, embeddings, lm_head) is
gathered in fp32, so A, D and the dt bias enter the scan unrounded and the residual stream starts
in fp32. Gradients are reduced (and accumulated over micro-batches) in fp32.
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
        if dev.type == "cuda":  # device_id: NCCL binds this GPU at once (no guessing in barriers)
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
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


def local_rows(rows: list, rank: int, world: int) -> list:
    """This process's share of a global batch: the ``rank``-th of ``world`` contiguous, disjoint
    slices (the batch splits evenly: schedule.check_batch_sizes). Concatenated in rank order the
    shares are the global batch, so N processes train on exactly the rows one process would."""
    per = len(rows) // world
    assert per * world == len(rows), (len(rows), world)
    return rows[rank * per:(rank + 1) * per]


def shard_modules(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: the modules a forward pass calls as a whole. For
    FalconMamba those are the mixers (the block norms are called apart from their block)."""
    units = [m for name, m in model.named_modules() if name.endswith(".mixer")]
    if not units:  # another architecture (the benchmark's Transformer): its blocks
        units = list(getattr(model, "shard_units", lambda: [])())
    return units


def low_precision_parts(unit: nn.Module) -> list[nn.Module]:
    """The parts of an FSDP2 unit all-gathered in bf16 under precision=bf16: a mixer's in_proj and
    out_proj (the rest holds the fp32-pinned A_log, D and dt bias); another architecture's whole unit."""
    if hasattr(unit, "A_log") and hasattr(unit, "in_proj") and hasattr(unit, "out_proj"):
        return [unit.in_proj, unit.out_proj]
    return [unit]


def wrap(module: nn.Module, inner: nn.Module, parallel: str, env: Env, bf16: bool = False) -> nn.Module:
    """Wrap the training module for data parallelism (a no-op with one process). ``bf16``: the
    run computes under bf16 autocast (FSDP2 then gathers the big matrices in bf16, see above)."""
    if not env.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        # Gradients as views of the all-reduce buckets: one copy of the gradients, not two.
        return DDP(module, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The mesh names the run's device type (FSDP2's default would take CUDA whenever it exists).
    mesh = init_device_mesh(env.device.type, (env.world,))
    for unit in shard_modules(inner):
        if bf16:
            parts = low_precision_parts(unit)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for part in parts:
                fully_shard(part, mesh=mesh, mp_policy=policy)
            if unit not in parts:
                fully_shard(unit, mesh=mesh)
        else:
            fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def set_grad_sync(module: nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: ``sync=False`` skips the gradient
    reduction (DDP: no all-reduce, gradients accumulate locally; FSDP2: no reduce-scatter,
    unsharded fp32 gradients accumulate, 4 bytes per parameter), so a step of k micro-batches
    reduces once instead of k times."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP) and not sync:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
