"""Training data: prepare text into token shards, mix sources by stage, sample packed sequences.

    from falcon_mamba.data import prepare, ShardSet, Sampler
    prepare(["corpus.txt"], "data/", tokenizer="bpe:8192")       # or a tokenizer.json / model folder
    data = ShardSet("data/")
    sampler = Sampler(data, seq_len=256, seed=0, mixture="", total_steps=1000)
    batch = sampler.load(sampler.next_batch(step=0, rows=8))    # Batch: input_ids, targets, reset, mask
"""

from falcon_mamba.data.mixture import parse_mixture, weights_at
from falcon_mamba.data.prepare import prepare
from falcon_mamba.data.sampler import Batch, Sampler, load_windows, val_windows
from falcon_mamba.data.shards import ShardSet

__all__ = ["Batch", "Sampler", "ShardSet", "load_windows", "parse_mixture", "prepare", "val_windows",
           "weights_at"]
