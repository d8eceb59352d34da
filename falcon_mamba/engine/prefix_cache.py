"""Session state cache: states keyed by the exact token prefix they have read.

A conversation's next turn re-sends everything said so far. With the state at the end of the last
answer (or at least at the end of the last prompt) kept here, the engine restores it and reads only
the new tokens: the time to first token of turn k no longer grows with k. A state has the same size
whatever the prefix length, so a 100k-token context costs one slot's bytes to keep.

- ``lookup(tokens)`` returns the longest cached key that is a strict prefix of ``tokens`` (at least
  one token must remain to read: the logits of the last prompt token are needed to sample).
- Entries are least-recently-used within ``max_bytes`` (states plus their token keys); an evicted
  entry is written to ``spill_dir`` when one is given, within ``max_disk_bytes``, and read back on
  a hit. The files go to a private subfolder of ``spill_dir`` (``falcon-mamba-spill.PID.*.tmp``)
  that is removed at ``close``; the folder itself and anything else in it are never touched, but
  for spill subfolders left by processes that no longer run (killed with kill -9), removed at start.

Keys are verified token by token on a hit; hashes only find candidates.
"""

from __future__ import annotations

import array
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from falcon_mamba.state import State, load_state


def _private_spill_dir(folder: Path) -> Path:
    """A new subfolder of folder for this process's spilled states (UserError if folder is a file
    or cannot be written)."""
    from falcon_mamba.atomic import remove_stale_temps
    from falcon_mamba.errors import UserError

    if folder.exists() and not folder.is_dir():
        raise UserError(f"--prefix-cache-dir {folder}: is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder / "falcon-mamba-spill")
        return Path(tempfile.mkdtemp(dir=folder, prefix=f"falcon-mamba-spill.{os.getpid()}.", suffix=".tmp"))
    except OSError as e:
        raise UserError(f"--prefix-cache-dir {folder}: cannot write there ({e.strerror})") from None


def _prefix_hashes(tokens: Sequence[int]):
    """Yield (length, hash of tokens[:length]) for length 1.. in one pass."""
    h = 0
    for i, t in enumerate(tokens, 1):
        h = hash((h, t))
        yield i, h


def _hash(tokens: Sequence[int]) -> int:
    h = 0
    for t in tokens:
        h = hash((h, t))
    return h


@dataclass(eq=False)
class _Entry:
    tokens: array.array  # int32 token ids of the key
    state: State | None  # in memory, or None when spilled
    state_bytes: int
    path: Path | None = None  # the spilled file

    @property
    def mem_bytes(self) -> int:
        return (self.state_bytes if self.state is not None else 0) + self.tokens.itemsize * len(self.tokens)


class PrefixCache:
    def __init__(self, max_bytes: int, spill_dir: str | os.PathLike | None = None,
                 max_disk_bytes: int = 0, device: torch.device | str = "cpu"):
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes if spill_dir else 0
        self.device = torch.device(device)
        self.spill_dir = _private_spill_dir(Path(spill_dir)) if spill_dir else None
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # LRU order
        self._lengths: dict[int, int] = {}  # key length -> how many entries have it
        self._lock = threading.Lock()
        self._file_no = 0
        self.mem_bytes = 0
        self.disk_bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_on_disk(self) -> int:
        return sum(1 for e in self._entries.values() if e.state is None)

    def kept_of(self, items: list, nbytes: int) -> list:
        """Of items to put in this order, states of nbytes each, those the cache would still hold
        after the last: the last ones its memory budget holds when evicted entries are dropped,
        all of them when they spill to disk. (A wave of prompts or answers ending in one step
        need put no more: the earlier ones would push each other out at once.)"""
        if self.spill_dir is not None:
            return items
        return items[max(0, len(items) - self.max_bytes // max(nbytes, 1)):]

    # ---- insert ------------------------------------------------------------------------------
    def put(self, tokens: Sequence[int], state: State) -> None:
        """Keep ``state`` (batch 1, having read exactly ``tokens``); the cache owns it from now."""
        if not self.enabled or not tokens:
            return
        assert state.batch_size == 1
        key = (len(tokens), _hash(tokens))
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.tokens == array.array("i", tokens):
                self._entries.move_to_end(key)
                return
            if old is not None:
                self._drop(key)
            if state.device != self.device:
                state = state.to(self.device)
            self._config = state.config
            entry = _Entry(array.array("i", tokens), state, state.nbytes)
            if entry.mem_bytes > self.max_bytes:
                return
            self._entries[key] = entry
            self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
            self.mem_bytes += entry.mem_bytes
            self._shrink()

    # ---- lookup ------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> tuple[int, State] | None:
        """(n, state having read tokens[:n]) for the longest cached strict prefix, or None.
        The state is the cache's own copy: copy it into a slot, never update it in place."""
        if not self.enabled or len(tokens) < 2:
            return None
        with self._lock:
            found = None
            lengths = self._lengths
            max_len = max((n for n in lengths if n < len(tokens)), default=0)
            if max_len:
                for n, h in _prefix_hashes(tokens[:max_len]):
                    if n in lengths and (n, h) in self._entries:
                        e = self._entries[(n, h)]
                        if e.tokens == array.array("i", tokens[:n]):
                            found = (n, h)
            if found is None:
                self.misses += 1
                return None
            entry = self._entries[found]
            self._entries.move_to_end(found)
            if entry.state is None:
                entry.state = load_state(entry.path, self._config, device=self.device)
                self._unspill(entry)
                self.mem_bytes += entry.mem_bytes
                self._shrink(keep=found)
            self.hits += 1
            self.tokens_saved += found[0]
            return found[0], entry.state

    # ---- memory ------------------------------------------------------------------------------
    def _shrink(self, keep=None) -> None:
        """Evict (spill, or drop) least-recently-used in-memory entries until within budget."""
        for key in list(self._entries):
            if self.mem_bytes <= self.max_bytes:
                break
            e = self._entries[key]
            if e.state is None or key == keep:
                continue
            self.mem_bytes -= e.mem_bytes
            if self.spill_dir is not None and e.state_bytes <= self.max_disk_bytes:
                self._spill(key, e)
            else:
                self._remove(key)
        # The disk budget: drop the least recently used spilled files.
        for key in list(self._entries):
            if self.disk_bytes <= self.max_disk_bytes:
                break
            e = self._entries[key]
            if e.state is None:
                self._remove(key)

    def _spill(self, key, e: _Entry) -> None:
        self._file_no += 1
        e.path = self.spill_dir / f"state-{self._file_no}.safetensors"
        e.state.save(e.path)
        self.disk_bytes += e.path.stat().st_size
        e.state = None
        # The key's tokens stay in memory, uncounted: 4 bytes a token against a state of megabytes.

    def _unspill(self, e: _Entry) -> None:
        self.disk_bytes -= e.path.stat().st_size
        e.path.unlink(missing_ok=True)
        e.path = None

    def _remove(self, key) -> None:
        e = self._entries.pop(key)
        n = key[0]
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
        if e.state is None and e.path is not None:
            self._unspill(e)

    def _drop(self, key) -> None:
        e = self._entries[key]
        if e.state is not None:
            self.mem_bytes -= e.mem_bytes
        self._remove(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def close(self) -> None:
        self.clear()
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
