"""A deterministic sampler of packed training sequences, whose position is a small dict that the
training checkpoint saves; and the fixed windows of the validation split.

Each source's training tokens are cut into windows of L+1 tokens (stride L: the last token of one
window is the first of the next, so every token is a target once per epoch). Each source walks its
windows in a fresh permutation per epoch. For step s the rows of the global batch pick their source
with a generator seeded by (seed, s) and the mixture weights at s / steps; each pick takes that
source's next window. The batch of step s therefore depends only on (seed, s, the cursors), not on
the number of processes, which is what lets a 2-process run match a 1-process run and a resumed run
match an uninterrupted one.

Legend: B rows, L sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from falcon_mamba.data.mixture import check_mixture, parse_mixture, weights_at
from falcon_mamba.data.shards import ShardSet, Source
from falcon_mamba.errors import UserError


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64: input_ids shifted by one
    reset: torch.Tensor  # (B, L) bool: True at the first token of a new document
    loss_mask: torch.Tensor | None  # (B, L) bool: False where the target is not trained on

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.targets.to(device), self.reset.to(device),
                     None if self.loss_mask is None else self.loss_mask.to(device))

    def rows(self, lo: int, hi: int) -> Batch:
        return Batch(self.input_ids[lo:hi], self.targets[lo:hi], self.reset[lo:hi],
                     None if self.loss_mask is None else self.loss_mask[lo:hi])

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel() if self.loss_mask is None else self.loss_mask.sum())


def load_windows(src: Source, starts: list[int], seq_len: int) -> Batch:
    """Read windows [start, start + L + 1) of one source (shorter ones are padded and masked)."""
    B, L = len(starts), seq_len
    ids = np.zeros((B, L + 1), dtype=np.int64)
    reset = np.zeros((B, L), dtype=bool)
    mask = np.zeros((B, L), dtype=bool)
    for r, s in enumerate(starts):
        w = np.asarray(src.tokens[s:s + L + 1], dtype=np.int64)
        ids[r, :len(w)] = w
        n = len(w) - 1  # targets in this window
        mask[r, :n] = True if src.mask is None else src.mask[s + 1:s + 1 + n].astype(bool)
        lo, hi = np.searchsorted(src.doc_starts, [s + 1, s + L])
        reset[r, src.doc_starts[lo:hi] - s] = True
    x = torch.from_numpy(ids)
    full = bool(mask.all())
    return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), torch.from_numpy(reset),
                 None if full else torch.from_numpy(mask))


def cat_batches(batches: list[Batch]) -> Batch:
    masks = [b.loss_mask if b.loss_mask is not None else torch.ones_like(b.reset) for b in batches]
    any_mask = any(b.loss_mask is not None for b in batches)
    return Batch(torch.cat([b.input_ids for b in batches]), torch.cat([b.targets for b in batches]),
                 torch.cat([b.reset for b in batches]), torch.cat(masks) if any_mask else None)


class Sampler:
    def __init__(self, data: ShardSet, seq_len: int, seed: int, mixture: str, total_steps: int):
        self.data = data
        self.seq_len = seq_len
        self.seed = seed
        self.total_steps = max(1, total_steps)
        self.sources = data.split("train")
        self.names = list(self.sources)
        self.n_windows = {n: max(0, (len(s) - 1) // seq_len) for n, s in self.sources.items()}
        if not any(self.n_windows.values()):
            longest = max(len(s) for s in self.sources.values())
            raise UserError(f"no training source holds seq_len + 1 = {seq_len + 1} tokens (the longest "
                            f"has {longest}); lower seq_len or add data")
        self.stages = parse_mixture(mixture)
        check_mixture(self.stages, self.names)
        self.cursor = {n: 0 for n in self.names}
        self.epoch = {n: 0 for n in self.names}
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    # ---- position: saved in and restored from the training checkpoint ------------------------
    def state_dict(self) -> dict:
        return {"cursor": dict(self.cursor), "epoch": dict(self.epoch), "seq_len": self.seq_len,
                "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seq_len"] != self.seq_len or sd["seed"] != self.seed or set(sd["cursor"]) != set(self.names):
            raise UserError("the checkpoint's data position belongs to other data (sources, seq_len or "
                            "seed differ); resume with the same data folder and recipe")
        self.cursor = dict(sd["cursor"])
        self.epoch = dict(sd["epoch"])

    def epochs_done(self) -> float:
        """Mean fraction of each source's windows consumed so far (weighted by size)."""
        total = sum(self.n_windows.values())
        return sum(self.epoch[n] * w + self.cursor[n] for n, w in self.n_windows.items()) / total

    # ---- drawing ------------------------------------------------------------------------------
    def _order(self, name: str) -> np.ndarray:
        ep = self.epoch[name]
        cached = self._perm.get(name)
        if cached is None or cached[0] != ep:
            rng = np.random.default_rng([self.seed, self.names.index(name), ep, 0x5EED])
            cached = (ep, rng.permutation(self.n_windows[name]))
            self._perm[name] = cached
        return cached[1]

    def next_batch(self, step: int, rows: int) -> list[tuple[str, int]]:
        """The (source, start token) of each row of the global batch of ``step``; advances the
        cursors. Every process calls it with the same arguments and reads its own rows."""
        w = weights_at(self.stages, step / self.total_steps, self.n_windows)
        p = np.array([w[n] for n in self.names])
        picks = np.random.default_rng([self.seed, step]).choice(len(self.names), size=rows, p=p)
        out = []
        for i in picks:
            name = self.names[i]
            start = int(self._order(name)[self.cursor[name]]) * self.seq_len
            self.cursor[name] += 1
            if self.cursor[name] == self.n_windows[name]:
                self.cursor[name] = 0
                self.epoch[name] += 1
            out.append((name, start))
        return out

    def load(self, picks: list[tuple[str, int]]) -> Batch:
        """Read the rows (in order) as one batch."""
        return cat_batches([load_windows(self.sources[n], [s], self.seq_len) for n, s in picks])


def val_windows(data: ShardSet, seq_len: int, max_tokens: int = 0) -> list[tuple[str, int]]:
    """Non-overlapping windows covering each validation source from its start (stride L, the last
    one shorter), at most ``max_tokens`` targets per source (0: all of them)."""
    out = []
    for name, src in data.split("val").items():
        n_targets = len(src) - 1
        if max_tokens:
            n_targets = min(n_targets, max_tokens)
        out += [(name, s) for s in range(0, n_targets, seq_len)]
    return out
