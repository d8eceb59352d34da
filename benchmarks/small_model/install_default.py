"""Install a trained small model as the package's embedded default model.

    python3 -m benchmarks.small_model.install_default RESULTS_DIR

RESULTS_DIR is the --results folder of compare.py: its mamba_model/ (HF format, bf16) is copied into
falcon_mamba/default_model/, with TRAINING.md (the table, and how it was made) beside it; the table,
the loss curves and both metrics files go to benchmarks/results/small_model/. Prints the README
snippet (table and plot).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    results = Path(argv[0])
    src = results / "mamba_model"
    dst = ROOT / "falcon_mamba" / "default_model"
    size = (src / "model.safetensors").stat().st_size
    if size > 17 * 1024 * 1024:
        print(f"{src}/model.safetensors is {size / 2**20:.1f} MiB; the embedded model must stay ~16 MB",
              file=sys.stderr)
        return 1
    for f in FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    table = (results / "results.md").read_text(encoding="utf-8")
    (dst / "TRAINING.md").write_text(
        "# The embedded default model\n\n"
        "Trained by this package's own pipeline on the offline corpus (Shakespeare, the King James Bible,\n"
        "the Python 3.11 docs, the Jargon File; the last 2% of each file held out), with an 8k BPE fitted\n"
        "to the training split: `bash benchmarks/small_model/train_default.sh` (recipe `default-model`).\n"
        "Beside it, a Transformer of the same parameter count trained on the same batches:\n\n"
        + table, encoding="utf-8")
    keep = ROOT / "benchmarks" / "results" / "small_model"
    keep.mkdir(parents=True, exist_ok=True)
    for f in ("results.md", "results.json", "loss_curves.png", "mamba_metrics.jsonl",
              "transformer_metrics.jsonl"):
        if (results / f).is_file():
            shutil.copyfile(results / f, keep / f)
    print(f"installed {src} -> {dst} ({size / 2**20:.1f} MiB of weights); results in {keep}")
    print("README snippet:\n")
    print(table.strip())
    print("\n![loss curves](benchmarks/results/small_model/loss_curves.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
