"""Loss and learning-rate curves of one or more runs, drawn from their metrics.jsonl to a PNG."""

from __future__ import annotations

from pathlib import Path

from falcon_mamba.errors import UserError
from falcon_mamba.train.metrics import read_metrics


def plot_runs(runs: list[tuple[str, str | Path]], out_png: str | Path, title: str = "") -> Path:
    """runs: [(label, run folder)]. Top: training loss (and validation loss, dots) against tokens;
    bottom: learning rate. Written atomically to out_png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'falcon-mamba[plot]'") from None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    drew = False
    for i, (label, run_dir) in enumerate(runs):
        rows = read_metrics(run_dir)
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        if not train and not val:
            raise UserError(f"{run_dir}: no metrics.jsonl lines to plot; is it a training run folder?")
        color = f"C{i}"
        if train:
            ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color, lw=1.2,
                         label=f"{label} train")
            ax_lr.plot([r["tokens"] for r in train], [r["lr"] for r in train], color=color, lw=1.2)
        if val:
            ax_loss.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o--", color=color,
                         ms=4, lw=0.8, label=f"{label} val")
        drew = True
    assert drew
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if title:
        ax_loss.set_title(title)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
