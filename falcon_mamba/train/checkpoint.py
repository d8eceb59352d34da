"""The training checkpoint: sharded with torch.distributed.checkpoint (DCP), one folder per save,
committed by a rename and then a pointer.

    OUT/checkpoints/latest              the name of the newest complete checkpoint (written last)
    OUT/checkpoints/step-00001000/
        .metadata                       DCP's index: each tensor's global shape and where its pieces lie
        __{rank}_0.distcp               what each process wrote: its shards of the model and AdamW states
        train_state.pt                  {"format", "config", "step", "sampler", "rng" (one per rank),
                                         "world_size", "loss_acc", "data"}: plain types and tensors,
                                         read back with weights_only=True (no pickled code runs)

One format for every run: one process, DDP and FSDP2 alike. A save (every process calls it): each
process writes its pieces into ``step-N.tmp/`` (FSDP2: its own shards; DDP: the replicated tensors
are spread over the processes and written once); rank 0 adds train_state.pt, flushes, renames the
folder to ``step-N`` and then rewrites ``latest`` (temp file + rename). A run killed at any point of a
save leaves ``latest`` naming the previous complete checkpoint; half-written folders are removed by
the next save or resume, and checkpoints older than the newest ``keep`` once ``latest`` has moved.
Every process writes into the same folder, so on several nodes OUT must be a shared filesystem.

Resharding: the metadata holds every tensor's global shape, so a checkpoint saved by N processes
loads into M (each reads the pieces its own shards cover), and ``read_tensors`` rebuilds the whole
model in one process for the HF export.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from falcon_mamba.errors import UserError

FORMAT = "falcon-mamba-train/2"
DIR = "checkpoints"
LATEST = "latest"
STATE = "train_state.pt"
LEGACY = "checkpoint.pt"  # the single-file format of earlier versions
_STEP_DIR = re.compile(r"step-(\d+)$")
# Test hook: each process stops after writing its shards (before the metadata and the commit) and
# waits to be killed (the kill-mid-save test).
_PAUSE_ENV = "FALCON_MAMBA_TEST_PAUSE_SAVE"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _no_dist() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _dcp_call(no_dist: bool):
    """DCP warns on every one-process save and load ("assuming the intent is ... a single
    process"); that is the intent here, so the warning is dropped."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer(folder: Path):
    from torch.distributed.checkpoint import FileSystemWriter

    if os.environ.get(_PAUSE_ENV):
        class PausingWriter(FileSystemWriter):
            def write_data(self, plan, planner):
                fut = super().write_data(plan, planner)
                fut.wait()
                # one write of the whole line: the ranks share stderr, and print() writes the text and its
                # newline separately, so two ranks' lines could run together
                sys.stderr.write(f"falcon-mamba: save paused (test hook) pid {os.getpid()}\n")
                sys.stderr.flush()
                while True:
                    time.sleep(1)

        return PausingWriter(folder, single_file_per_rank=True, sync_files=True)
    return FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)


def has_legacy(out_dir: str | Path) -> bool:
    return (Path(out_dir) / LEGACY).is_file()


def _legacy_error(out_dir: Path) -> UserError:
    return UserError(f"{out_dir / LEGACY} is a checkpoint of the single-file format of an earlier "
                     "falcon-mamba (before sharded checkpoints); continue or export it with that version, "
                     "or start a new --out")


def latest_dir(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None when the run has none."""
    out_dir = Path(out_dir)
    pointer = out_dir / DIR / LATEST
    if not pointer.is_file():
        if has_legacy(out_dir):
            raise _legacy_error(out_dir)
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    folder = out_dir / DIR / name
    complete = (folder / ".metadata").is_file() and (folder / STATE).is_file()
    if not _STEP_DIR.fullmatch(name) or not complete:
        raise UserError(f"{pointer} names {name!r}, which is not a complete checkpoint folder; "
                        f"point it at another {out_dir / DIR}/step-* folder or start a new --out")
    return folder


def _folder(path: str | Path) -> Path:
    """A checkpoint folder from a run folder or a checkpoint folder."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    folder = latest_dir(path)
    if folder is None:
        raise UserError(f"{path}: no training checkpoint here (no {DIR}/{LATEST})")
    return folder


def prune(out_dir: str | Path, keep: int) -> None:
    """Remove half-written folders, folders ``latest`` does not lead to (from a run killed between
    the rename and the pointer), and all but the newest ``keep`` complete checkpoints."""
    root = Path(out_dir) / DIR
    if not root.is_dir():
        return
    pointer = root / LATEST
    m = _STEP_DIR.fullmatch(pointer.read_text(encoding="utf-8").strip()) if pointer.is_file() else None
    current_step = int(m.group(1)) if m else -1
    done = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if p.is_dir() and m and int(m.group(1)) <= current_step:
            done.append((int(m.group(1)), p))
        elif p.is_dir():  # step-N.tmp, or step-N past the pointer
            shutil.rmtree(p, ignore_errors=True)
    for _, p in sorted(done, reverse=True)[max(1, keep):]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(LATEST + ".tmp*"):
        p.unlink(missing_ok=True)


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, keep: int = 1) -> Path:
    """Save the run at ``step`` (see the module docstring). Every process calls it with its own
    (DDP, FSDP2 or plain) model and optimizer; train_state is written by rank 0. Returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out_dir) / DIR
    name = f"step-{step:08d}"
    tmp, final = root / (name + ".tmp"), root / name
    main = _is_main()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()  # the folder exists (and holds nothing stale) before anyone writes into it
    msd, osd = get_state_dict(model, optimizer)
    with _dcp_call(_no_dist()):
        dcp.save({"model": msd, "optim": osd}, storage_writer=_writer(tmp), no_dist=_no_dist())
    if main:
        torch.save({"format": FORMAT, "step": step, **train_state}, tmp / STATE)
        with open(tmp / STATE, "rb+") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        pointer = root / LATEST
        assert not (pointer.is_file() and pointer.read_text(encoding="utf-8").strip() == name), name
        if final.exists():  # an orphan past the pointer, left by a run killed mid-commit
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        ptmp = root / f"{LATEST}.tmp{os.getpid()}"
        with open(ptmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptmp, pointer)
        _fsync_dir(root)
        prune(out_dir, keep)
    _barrier()  # when save returns, on any process, the checkpoint is committed
    return final


def load_train_state(path: str | Path) -> dict:
    """train_state.pt of a checkpoint (a run folder: its latest; or a step-N folder)."""
    folder = _folder(path)
    try:
        payload = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle: all mean "not our checkpoint"
        raise UserError(f"{folder / STATE}: not a readable training checkpoint "
                        f"({str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{folder / STATE}: not a falcon-mamba training checkpoint (format {FORMAT})")
    return {**payload, "folder": folder}


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer states in place, resharded to this run's processes (every
    process calls it; each reads the pieces of its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The targets: this run's (sharded) tensors; an optimizer without state gets zero states first.
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    try:
        with _dcp_call(_no_dist()):
            dcp.load(sd, storage_reader=FileSystemReader(folder), no_dist=_no_dist())
    except Exception as e:  # missing keys or shapes: another model; a damaged file
        raise UserError(f"{folder}: the checkpoint does not load into this model "
                        f"({str(e).strip().splitlines()[-1][:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def read_tensors(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor saved under ``prefix``, whole, in this process (for the export and tests):
    "model." gives the model's state dict by parameter name. Reads only those tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(_folder(path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with _dcp_call(True):
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}


def load_checkpoint(path: str | Path) -> dict:
    """train_state plus the whole model ("model": {name: tensor}), in one process."""
    state = load_train_state(path)
    return {**state, "model": read_tensors(state["folder"])}


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
