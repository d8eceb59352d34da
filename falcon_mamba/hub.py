"""Resolving a model reference (a local folder or a Hugging Face Hub id) to a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from falcon_mamba.errors import UserError

_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]


def resolve_model_dir(ref: str | os.PathLike) -> Path:
    """A local folder as is; otherwise an ``org/name`` Hub id, downloaded (safetensors only)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path}: is a file; pass the model folder that holds config.json")
    ref = str(ref)
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"{ref}: no such folder; pass a model folder or a Hub id like org/name")
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise UserError(f"{ref}: not a local folder and the Hub is offline (HF_HUB_OFFLINE); "
                        "download it elsewhere and pass the local folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=_PATTERNS))
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"{ref}: could not download from the Hugging Face Hub "
                        f"({type(e).__name__}); if you are offline, pass a local model folder") from None
