"""Validation loss and bits per byte on the held-out split of a prepared data folder.

The split is read in windows of L + 1 tokens (stride L) from each source's start, each window from a
fresh state, with resets at document starts, exactly as training sees text. Bits per byte =
total NLL (nats) / ln 2 / the UTF-8 bytes those targets encode; with the whole split evaluated the
byte count is exact, with ``max_tokens`` it is the split's bytes pro rata.
"""

from __future__ import annotations

import math

import torch

from falcon_mamba.data.sampler import Batch, cat_batches, load_windows, val_windows
from falcon_mamba.data.shards import ShardSet
from falcon_mamba.train.distributed import Env, all_reduce_sum


@torch.no_grad()
def evaluate(module: torch.nn.Module, data: ShardSet, seq_len: int, micro_batch: int, env: Env,
             autocast, max_tokens: int = 0) -> dict | None:
    """-> {"val_loss", "val_bpb", "val_tokens"} (None when the data has no validation split).
    Every process must call it: each evaluates a share of the windows, then the sums are reduced."""
    windows = val_windows(data, seq_len, max_tokens)
    if not windows:
        return None
    sources = data.split("val")
    mine = windows[env.rank::env.world]
    # Same number of forward passes on every process (FSDP2 gathers weights collectively).
    n_iter = math.ceil(math.ceil(len(windows) / env.world) / micro_batch)
    nll = torch.zeros((), dtype=torch.float64, device=env.device)
    stats = torch.zeros(2, dtype=torch.float64, device=env.device)  # targets, bytes
    was_training = module.training
    module.eval()
    for i in range(n_iter):
        chunk = mine[i * micro_batch:(i + 1) * micro_batch]
        if chunk:
            parts = [load_windows(sources[n], [s], seq_len) for n, s in chunk]
            batch = cat_batches(parts)
            for (n, _), b in zip(chunk, parts):
                src = sources[n]
                t = b.num_targets
                stats[0] += t
                stats[1] += t * src.nbytes / max(1, len(src) - 1)
        else:  # nothing left here: a masked dummy pass keeps the collectives in step
            ids = torch.zeros(1, seq_len, dtype=torch.long)
            off = torch.zeros(1, seq_len, dtype=torch.bool)
            batch = Batch(ids, ids, off, off)
        batch = batch.to(env.device)
        with autocast():
            nll += module(batch.input_ids, batch.targets, batch.reset, batch.loss_mask).double()
    module.train(was_training)
    all_reduce_sum(nll, env)
    all_reduce_sum(stats, env)
    targets, nbytes = stats.tolist()
    total = nll.item()
    return {"val_loss": total / max(1.0, targets), "val_bpb": total / math.log(2) / max(1.0, nbytes),
            "val_tokens": int(targets)}
