"""The on-disk tuning cache: what the decode autotune chose, per GPU, model shape, dtype and format.

A restarted server (or a second `generate`) on the same GPU reads its batch-1 decode mode from here
instead of timing every candidate again (capturing and timing ~8 graphs of a 7B step takes tens of
seconds). One JSON file per GPU name under the cache folder:

    ~/.cache/falcon-mamba/tuning/NVIDIA_H200.json   {"<key>": {"mode": ..., "pdl": ..., "ms": {...}}}

Keys name everything the choice depends on (model shape, dtype, weight format, the versions of
falcon-mamba, torch and Triton), so a different model or an upgrade never reuses a stale choice. The
file is rewritten atomically (temp file + rename); a damaged file is ignored (and replaced on the
next write), never an error: the cache only saves time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

DEFAULT_DIR = Path.home() / ".cache" / "falcon-mamba" / "tuning"


def cache_dir(option: str | None) -> Path | None:
    """The folder for DecodeOptions.tuning_cache (None: the default; "": off)."""
    if option == "":
        return None
    return Path(option).expanduser() if option else DEFAULT_DIR


def _gpu_file(folder: Path, device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".json")


def model_key(model, rows: int) -> str:
    """Everything the decode choice depends on, as one string."""
    import triton

    from falcon_mamba import __version__

    c = model.config
    q = getattr(model, "quantization", None) or {}
    fmt = f"int{q.get('bits')}g{q.get('group_size')}" if q else "dense"
    return (f"decode|rows={rows}|H={c.hidden_size}|D={c.intermediate_size}|N={c.state_size}|"
            f"R={c.time_step_rank}|V={c.vocab_size}|L={c.num_hidden_layers}|bcdt={c.bcdt_rms}|"
            f"dtype={str(model.dtype).removeprefix('torch.')}|fmt={fmt}|fm={__version__}|"
            f"torch={torch.__version__}|triton={triton.__version__}")


def load(folder: Path | None, device: torch.device, key: str) -> dict | None:
    if folder is None:
        return None
    try:
        data = json.loads(_gpu_file(folder, device).read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def store(folder: Path | None, device: torch.device, key: str, entry: dict) -> None:
    """Add one entry (best effort: an unwritable folder only costs the next start its timing)."""
    if folder is None:
        return
    path = _gpu_file(folder, device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass
