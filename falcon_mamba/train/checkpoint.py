"""The training checkpoint: the whole state of a run in one file, written atomically.

    OUT/checkpoint.pt     {"format", "config", "step", "model", "optimizer", "sampler", "rng",
                           "world_size", "data"}  (torch.save of tensors and plain types only;
                           read back with weights_only=True, so loading never runs pickled code)

A save writes ``checkpoint.pt.tmp-<pid>`` in the same folder, flushes it to disk and renames it
over ``checkpoint.pt``: the last good checkpoint is never overwritten in place, and a process killed
mid-save leaves it intact (plus a stray temp file, removed by the next save or resume).

Model and optimizer states are "full" state dicts keyed by parameter name (gathered from DDP or
FSDP2 shards by torch.distributed.checkpoint.state_dict), so a run saved with N processes can resume
with M.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import torch

from falcon_mamba.errors import UserError

FORMAT = "falcon-mamba-train/1"
NAME = "checkpoint.pt"
# Test hook: pause (for the kill-mid-save test) once this many bytes of the temp file are written.
_PAUSE_ENV = "FALCON_MAMBA_TEST_PAUSE_SAVE_AFTER_BYTES"


class _PausingWriter(io.RawIOBase):
    """File wrapper that stops writing after a byte budget and waits to be killed (tests only)."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.n = f, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        if self.n > self.limit:
            self.f.flush()
            print("falcon-mamba: save paused (test hook)", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        return self.f.write(b)


def remove_stale_temps(out_dir: Path) -> None:
    for p in Path(out_dir).glob(NAME + ".tmp-*"):
        p.unlink(missing_ok=True)


def save_checkpoint(out_dir: str | Path, payload: dict) -> Path:
    """Write payload to OUT/checkpoint.pt atomically (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    final = out_dir / NAME
    tmp = out_dir / f"{NAME}.tmp-{os.getpid()}"
    payload = {"format": FORMAT, **payload}
    try:
        with open(tmp, "wb") as f:
            limit = os.environ.get(_PAUSE_ENV)
            torch.save(payload, _PausingWriter(f, int(limit)) if limit else f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        # Make the rename itself durable.
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (a file, or the run folder that holds checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / NAME
    if not path.is_file():
        raise UserError(f"{path}: no training checkpoint here")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle: all mean "not our checkpoint"
        raise UserError(f"{path}: not a readable training checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a falcon-mamba training checkpoint (format {FORMAT})")
    return payload


def config_mismatch(saved: dict, current: dict, free: set[str]) -> list[str]:
    """The settings that differ between a checkpoint's config and the current one, except the
    ``free`` ones (bookkeeping that does not change the computation)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in free:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in config_mismatch(a, b, set())]
        elif a != b:
            diffs.append(f"{key} ({a!r} in the checkpoint, {b!r} now)")
    return diffs
