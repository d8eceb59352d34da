"""Train the small Falcon Mamba and a Transformer of the same parameter count on the same data,
tokens and schedule; report validation bits per byte (the paper's central claim at small scale).

    python3 -m benchmarks.small_model.compare --data DATA --out RUNS [--preset default-model]
        [--time-budget S] [--set key=value ...] [--results DIR]

The Mamba runs first; with --time-budget its step count is fixed after warm-up to fit the budget,
and the Transformer then runs exactly those steps (same seed, so the same batches in the same
order). Output: RUNS/{mamba,transformer}/ (full runs) and the small files worth keeping in
--results (default RUNS/results): results.json, results.md, loss_curves.png, both metrics files
and the exported bf16 Mamba (mamba_model/). Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.small_model.transformer import TransformerLM, match_mamba  # noqa: E402
from falcon_mamba.train import apply_overrides, get_recipe, train  # noqa: E402
from falcon_mamba.train.metrics import read_metrics  # noqa: E402
from falcon_mamba.train.plot import plot_runs  # noqa: E402


def _mean_tok_s(run_dir: Path) -> float:
    rows = [r for r in read_metrics(run_dir) if "tok_s" in r][1:]  # the first interval holds warm-up
    return sum(r["tok_s"] for r in rows) / max(1, len(rows))


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _commit() -> str:
    if os.environ.get("GIT_COMMIT"):  # the device machine's copy of the tree has no .git
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="default-model")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the Mamba run (0: the preset's steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--results", default=None, help="folder for the files worth keeping")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    out = Path(args.out)
    results = Path(args.results) if args.results else out / "results"
    cfg = apply_overrides(get_recipe(args.preset), args.set)
    if args.time_budget:
        cfg = cfg.replace(time_budget_s=args.time_budget)
    progress = not args.no_progress

    t0 = time.perf_counter()
    mamba = train(cfg, args.data, out / "mamba", progress=progress, export_dtype=torch.bfloat16)
    t_mamba = time.perf_counter() - t0
    # The same steps, tokens, schedule and batches for the Transformer.
    tcfg_model = match_mamba(mamba.config.model)
    t0 = time.perf_counter()
    trans = train(mamba.config.replace(time_budget_s=0.0), args.data, out / "transformer",
                  model_fn=lambda _mc: TransformerLM(tcfg_model), progress=progress)
    t_trans = time.perf_counter() - t0

    mc = mamba.config.model
    rows = [
        {"model": "Falcon Mamba", "parameters": mc.num_parameters,
         "shape": f"{mc.num_hidden_layers} layers, H {mc.hidden_size}, D {mc.intermediate_size}, "
                  f"N {mc.state_size}",
         "val_bpb": mamba.val_bpb, "val_loss": mamba.val_loss, "train_loss": mamba.train_loss,
         "tok_s": _mean_tok_s(out / "mamba"), "wall_s": t_mamba},
        {"model": "Transformer", "parameters": tcfg_model.num_parameters,
         "shape": f"{tcfg_model.num_layers} layers, H {tcfg_model.hidden_size}, "
                  f"{tcfg_model.num_heads} heads, MLP {tcfg_model.mlp_size}",
         "val_bpb": trans.val_bpb, "val_loss": trans.val_loss, "train_loss": trans.train_loss,
         "tok_s": _mean_tok_s(out / "transformer"), "wall_s": t_trans},
    ]
    c = mamba.config
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    meta = {"steps": mamba.steps, "tokens": mamba.tokens, "seq_len": c.seq_len,
            "global_batch": c.global_batch, "lr": c.lr, "schedule": c.schedule,
            "vocab_size": mc.vocab_size, "preset": args.preset, "device": device, "torch": torch.__version__,
            "commit": _commit(), "date": time.strftime("%Y-%m-%d")}

    results.mkdir(parents=True, exist_ok=True)
    plot_runs([("Falcon Mamba", out / "mamba"), ("Transformer", out / "transformer")],
              results / "loss_curves.png",
              title=f"{mc.num_parameters / 1e6:.1f}M parameters, {_count(mamba.tokens)} tokens, same batches")
    for name in ("mamba", "transformer"):
        shutil.copyfile(out / name / "metrics.jsonl", results / f"{name}_metrics.jsonl")
    if mamba.model_dir is not None:
        shutil.copytree(mamba.model_dir, results / "mamba_model", dirs_exist_ok=True)
    lines = ["| model | parameters | shape | val bits/byte | val loss | train loss | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['shape']} | {r['val_bpb']:.4f} | "
                     f"{r['val_loss']:.4f} | {r['train_loss']:.4f} | {r['tok_s']:,.0f} |")
    lines.append("")
    lines.append(f"{meta['steps']} steps, {meta['tokens']:,} tokens of {c.seq_len}, the same batches for "
                 f"both; {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.")
    table = "\n".join(lines)
    (results / "results.md").write_text(table + "\n", encoding="utf-8")
    record = {"rows": rows, **meta}
    (results / "results.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
