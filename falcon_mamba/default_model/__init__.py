"""The small Falcon Mamba embedded in the package, used by generate, chat and serve without --model.

The folder holds an ordinary HF-format model (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) and TRAINING.md, how it was made. It was trained by this package's own
pipeline: `benchmarks/small_model/train_default.sh` (recipe `default-model`).

    from falcon_mamba import default_model, load_model
    model = load_model(default_model.path())
"""

from __future__ import annotations

from pathlib import Path

FILES = ("config.json", "model.safetensors", "tokenizer.json")


def folder() -> Path:
    return Path(__file__).resolve().parent


def available() -> bool:
    return all((folder() / f).is_file() for f in FILES)


def path() -> Path:
    """The embedded model's folder; UserError when this install has none."""
    from falcon_mamba.errors import UserError

    if not available():
        missing = [f for f in FILES if not (folder() / f).is_file()]
        raise UserError(f"the embedded default model is not in this install ({folder()} lacks "
                        f"{', '.join(missing)}); pass --model FOLDER, or build it with "
                        "benchmarks/small_model/train_default.sh")
    return folder()
