"""Run visibility: metrics as JSON lines (OUT/metrics.jsonl) and a progress bar.

Each training line: {"step", "tokens", "loss" (mean over the steps since the previous line), "lr",
"batch", "tok_s", "mfu" (null when the peak is unknown), "grad_norm", "epochs", "elapsed_s"}.
Each evaluation line: {"step", "tokens", "val_loss", "val_bpb", "val_tokens"}. ``step`` counts
completed optimizer steps. On resume, lines past the checkpoint's step are dropped first, so the
file always describes one consistent run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything before it is good
    return rows


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only lines with step <= ``step`` (rewritten atomically)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    """Appends JSON lines, flushed one by one (rank 0 only; other ranks get enabled=False)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.f = open(Path(run_dir) / METRICS, "a", encoding="utf-8") if enabled else None

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class Progress:
    """tqdm bar with loss, tokens/s, MFU and lr (a no-op when disabled)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int, row: dict | None = None) -> None:
        if self.bar is None:
            return
        if row is not None:
            post = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tok_s']:,.0f}",
                    "mfu": "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%",
                    "lr": f"{row['lr']:.2e}"}
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
