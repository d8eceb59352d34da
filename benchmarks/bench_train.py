"""Training speed (issue 18): Falcon Mamba and the Llama-style Transformer of the same parameter count
and width, trained on the same shapes in one run, and `falcon-mamba train` on the Mamba's shape,
all against the bf16 matmul rate measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_train.py [--out DIR]         # ~1.5B, 8 x 2048, + the CLI
    PYTHONPATH=. python3 benchmarks/bench_train.py --shape 7b          # the 7B recipe's step
    PYTHONPATH=. python3 benchmarks/bench_train.py --shape tiny        # CPU smoke
        [--models mamba,mamba-plain,transformer] [--steps N] [--warmup N] [--no-cli] [--keep-cli-run]

Shapes: ``1.5b`` H 2048, 48 layers, D 4096, N 16, R 128, vocab 65,024, 8 x 2048 tokens per step;
``7b`` the published 7B (H 4096, 64 layers, D 8192, R 256), micro batch 1 x 2048 with activation
checkpointing, 8 micro-batches per optimizer step (the recipe accumulates 2,048 on one GPU, so the
optimizer's share here is an upper bound); ``tiny`` a CPU-sized model, 2 x 64 tokens.

Each model is built on the device with the training recipe's settings: fp32 master weights, bf16
autocast on CUDA (fp32 on the CPU), the AdamW of train/optim.py (fused on CUDA), grad clip 1.0, the
objective of train/objective.py (the fused lm_head + loss; ``mamba-plain`` is the Mamba with the
plain F.cross_entropy of fp32 logits, to see what the fused loss buys). ``warmup`` optimizer steps,
then ``steps`` timed ones, the device synchronised around each: tok/s from the median step. MFU =
tok/s x the training FLOPs per token of train/flops.py (the figure the loop uses) / the measured
matmul rate. Peak memory = max_memory_allocated over the model's run (weights, grads, optimizer
state, activations).

The CLI row runs ``python -m falcon_mamba train`` in a subprocess with the same settings on a
synthetic data folder of the same shape (random tokens, a word-level tokenizer of exactly V tokens,
no validation split, so no evaluation), one metrics line per step, and reads the median tok/s and
MFU of its steps after the warm-up from metrics.jsonl, and the peak it divided by from its log. Its
work folder (data, checkpoint, exported bf16 model) is deleted afterwards unless --keep-cli-run.

Prints the table, writes train-<gpu>-<shape>-<commit>.json under --out, then prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.small_model.transformer import TransformerLM, match_mamba  # noqa: E402
from falcon_mamba import ops  # noqa: E402
from falcon_mamba.cli._bench_util import env_record  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.train import apply_overrides, get_recipe  # noqa: E402
from falcon_mamba.train.build import enable_activation_checkpointing  # noqa: E402
from falcon_mamba.train.distributed import shard_modules  # noqa: E402
from falcon_mamba.train.flops import flops_per_token, mamba_flops_per_token, measure_matmul_flops  # noqa: E402
from falcon_mamba.train.objective import LMObjective  # noqa: E402
from falcon_mamba.train.optim import build_optimizer  # noqa: E402

GIB = 1024 ** 3
SHAPES = {
    "1.5b": {"model": {"hidden_size": 2048, "num_hidden_layers": 48, "intermediate_size": 4096,
                       "state_size": 16, "time_step_rank": 128},
             "vocab": 65024, "batch": 8, "seq_len": 2048, "accum": 1, "checkpointing": False,
             "warmup": 3, "steps": 10},
    "7b": {"model": {"hidden_size": 4096, "num_hidden_layers": 64, "intermediate_size": 8192,
                     "state_size": 16, "time_step_rank": 256},
           "vocab": 65024, "batch": 1, "seq_len": 2048, "accum": 8, "checkpointing": True,
           "warmup": 1, "steps": 3},
    "tiny": {"model": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                       "state_size": 8, "time_step_rank": 8},
             "vocab": 512, "batch": 2, "seq_len": 64, "accum": 1, "checkpointing": False,
             "warmup": 1, "steps": 3},
}
MODELS = ("mamba", "mamba-plain", "transformer")


def overrides(shape: dict) -> list[str]:
    """The --set list of `falcon-mamba train` (preset tiny) for a shape; the bench builds its own
    TrainConfig from the same list, so both run the same settings."""
    sets = [f"model.{k}={v}" for k, v in shape["model"].items()]
    sets += [f"seq_len={shape['seq_len']}", f"micro_batch={shape['batch']}",
             f"global_batch={shape['batch'] * shape['accum']}", "lr=3e-4", "warmup_steps=2",
             f"activation_checkpointing={str(shape['checkpointing']).lower()}", "log_every=1",
             "eval_every=0", "save_every=0", "grad_clip=1.0"]
    return sets


def train_config(shape: dict):
    cfg = apply_overrides(get_recipe("tiny"), overrides(shape))
    return cfg.replace(model=cfg.model.replace(vocab_size=shape["vocab"], eos_token_id=0, pad_token_id=0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(kind: str, cfg, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = TransformerLM(match_mamba(cfg.model)) if kind == "transformer" else FalconMamba(cfg.model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(shard_modules(model))
    return model.train()


def bench_model(kind: str, cfg, shape: dict, device: torch.device, warmup: int, steps: int,
                use_bf16: bool, rate: float | None, profile: bool = False) -> dict:
    """One model's row: median step time, tok/s, MFU, peak memory, the losses it saw; with profile,
    also one more step under torch.profiler: its kernels by GPU time (where the step's time goes)."""
    free(device)
    model = build(kind, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    objective = LMObjective(model, fused=kind != "mamba-plain")
    optimizer = build_optimizer(objective, cfg)
    B, L, accum = shape["batch"], shape["seq_len"], shape["accum"]
    gen = torch.Generator(device).manual_seed(1)
    reset = torch.zeros(B, L, dtype=torch.bool, device=device)
    params = [p for p in objective.parameters() if p.requires_grad]
    losses = []

    def step() -> None:
        total = torch.zeros((), device=device)
        for _ in range(accum):
            ids = torch.randint(0, shape["vocab"], (B, L + 1), device=device, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = objective(ids[:, :-1], ids[:, 1:], reset, None)
            (loss / (B * L * accum)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item() / (B * L * accum))  # the loop reads its loss back each step too

    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    tok_s = B * L * accum / t
    fpt = flops_per_token(model, L)
    row = {"model": kind, "parameters": n_params, "layers": len(shard_modules(model)),
           "step_s": t, "step_times_s": times, "tok_s": tok_s, "flops_per_token": fpt,
           "mfu": None if rate is None else tok_s * fpt / rate,
           "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda"
                               else None),
           "losses": losses}
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        row["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45,
                                                   max_name_column_width=70)
        print(f"--- {kind}: one step under torch.profiler ---\n{row['profile']}", flush=True)
    return row  # the model and its optimizer go with this frame; the caller frees the cache


# ---- `falcon-mamba train` on the same shape ------------------------------------------------------
def synthetic_data(folder: Path, vocab: int, seq_len: int, rows: int) -> Path:
    """A prepared data folder of random tokens: one source, one document (no resets), enough
    windows for ``rows`` sequences, no validation split; a word-level tokenizer of exactly ``vocab``
    tokens (id 0 is the eos token) so the fresh model gets that vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from falcon_mamba.data.shards import FORMAT, ShardWriter, dtype_for_vocab

    folder.mkdir(parents=True, exist_ok=True)
    words = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    dtype = dtype_for_vocab(vocab)
    ids = np.random.default_rng(0).integers(1, vocab, size=rows * seq_len + 1).tolist()
    entry = {"files": []}
    for split, docs in (("train", [ids]), ("val", [])):
        w = ShardWriter(folder, split, "random", dtype, with_mask=False)
        for d in docs:
            w.add(d, len(d))
        entry[split] = w.close()
    meta = {"format": FORMAT, "dtype": dtype, "vocab_size": vocab, "eos_token_id": 0, "chat": False,
            "val_fraction": 0.0, "tokenizer": "synthetic word-level", "sources": {"random": entry}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


def bench_cli(shape: dict, warmup: int, steps: int, work: Path, peak_tflops: float, fpt: float,
              rate: float | None) -> dict:
    """Run `python -m falcon_mamba train` for warmup + steps steps; its median tok/s and MFU."""
    n = warmup + steps
    data = synthetic_data(work / "data", shape["vocab"], shape["seq_len"],
                          max(16, n * shape["batch"] * shape["accum"]))
    run = work / "run"
    sets = overrides(shape) + ([f"peak_tflops={peak_tflops:g}"] if peak_tflops > 0 else [])
    cmd = [sys.executable, "-m", "falcon_mamba", "train", "--preset", "tiny", "--data", str(data),
           "--out", str(run), "--steps", str(n), "--no-progress", "--export-dtype", "bfloat16"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                     if p))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    res = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        res["error"] = log[-3000:]
        return res
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tok_s" in r][warmup:]
    m = re.search(r"^MFU against (.*)$", log, re.M)
    tok_s = statistics.median(r["tok_s"] for r in rows)
    mfus = [r["mfu"] for r in rows if r["mfu"] is not None]
    res.update({"tok_s": tok_s, "tok_s_per_step": [r["tok_s"] for r in rows],
                "mfu": statistics.median(mfus) if mfus else None, "peak": m.group(1) if m else None,
                "mfu_at_bench_rate": None if rate is None else tok_s * fpt / rate,
                "losses": [r["loss"] for r in rows], "log_tail": log[-1500:]})
    return res


# ---- output ------------------------------------------------------------------------------------------
def table(rec: dict) -> str:
    rate = rec["matmul_flop_per_s"]
    names = {"mamba": "Falcon Mamba (falcon_mamba.model, fused loss)",
             "mamba-plain": "Falcon Mamba, plain loss (fp32 logits + F.cross_entropy)",
             "transformer": "Llama-style Transformer, same parameters and width"}
    lines = [f"training, shape {rec['shape']}: {rec['tokens_per_step']:,} tokens per optimizer step "
             f"({rec['batch']} x {rec['seq_len']} x {rec['accum']} micro-batches), "
             f"{'activation checkpointing, ' if rec['checkpointing'] else ''}"
             f"{'bf16 autocast' if rec['bf16'] else 'fp32'}, {rec['env']['gpu'] or rec['env']['device']}, "
             f"ops {rec['ops_backend']}",
             f"matmul rate measured in this run: {rate / 1e12:.4g} TFLOP/s ({rec['matmul_dtype']})",
             "", "| model | parameters | tok/s | MFU (measured peak) | peak memory | step |",
             "|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        name = names[r["model"]] + (f", {r['layers']} layers" if r["model"] == "transformer" else "")
        if "error" in r:
            lines.append(f"| {name} | | {r['error']} | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
        lines.append(f"| {name} | {r['parameters'] / 1e6:,.1f}M | {r['tok_s']:,.0f} | {mfu} | {mem} | "
                     f"{1e3 * r['step_s']:.1f} ms |")
    cli = rec.get("cli")
    if cli and "error" not in cli:
        mfu = "-" if cli["mfu"] is None else f"{100 * cli['mfu']:.1f}% (of {cli['peak']})"
        lines.append(f"| `falcon-mamba train` on the Mamba shape (its own log) | | {cli['tok_s']:,.0f} "
                     f"| {mfu} | | |")
    elif cli:
        lines.append(f"| `falcon-mamba train` | | failed (rc {cli['returncode']}), see the JSON | | | |")
    by = {r["model"]: r for r in rec["rows"] if "error" not in r}
    lines.append("")
    if "mamba" in by and "transformer" in by:
        lines.append(f"Mamba / Transformer tok/s: {by['mamba']['tok_s'] / by['transformer']['tok_s']:.2f}x "
                     "(target >= 1.25x)")
    if "mamba" in by and "mamba-plain" in by:
        m, p = by["mamba"], by["mamba-plain"]
        mem = "" if m["peak_memory_gib"] is None else (f", peak memory {m['peak_memory_gib']:.1f} vs "
                                                        f"{p['peak_memory_gib']:.1f} GiB")
        lines.append(f"fused loss vs plain loss: tok/s {m['tok_s'] / p['tok_s']:.2f}x{mem}")
    if cli and "error" not in cli and "mamba" in by:
        ratio = cli["tok_s"] / by["mamba"]["tok_s"]
        mfu = cli.get("mfu_at_bench_rate")
        lines.append(f"`falcon-mamba train` / benchmark: tok/s {ratio:.3f}x"
                     + ("" if mfu is None or by["mamba"]["mfu"] is None else
                        f", MFU {mfu / by['mamba']['mfu']:.3f}x at this run's matmul rate")
                     + f" (target within 5%); the CLI run took {cli['wall_s']:.0f} s in all")
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="1.5b")
    p.add_argument("--models", default="mamba,transformer",
                   help=f"comma-separated, from {', '.join(MODELS)} (default mamba,transformer)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default per shape)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per shape)")
    p.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default per shape)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--checkpointing", choices=("on", "off"), default=None,
                   help="activation checkpointing (default: on for 7b only)")
    p.add_argument("--no-cli", action="store_true", help="skip the `falcon-mamba train` row")
    p.add_argument("--keep-cli-run", action="store_true", help="keep the CLI's run folder (checkpoint)")
    p.add_argument("--profile", action="store_true",
                   help="one more step of each model under torch.profiler (GPU): its kernels by time")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="pass this peak to the CLI run (default: it measures its own; on the CPU the "
                        "rate measured here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON file")
    args = p.parse_args(argv)

    shape = dict(SHAPES[args.shape])
    for key, val in (("batch", args.batch), ("seq_len", args.seq_len), ("accum", args.accum),
                     ("warmup", args.warmup), ("steps", args.steps)):
        if val is not None:
            if val < (0 if key == "warmup" else 1):
                p.error(f"--{key.replace('_', '-')} must be at least {0 if key == 'warmup' else 1}")
            shape[key] = val
    if args.checkpointing is not None:
        shape["checkpointing"] = args.checkpointing == "on"
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODELS]
    if bad or not kinds:
        p.error(f"--models: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(MODELS)}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device, named (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    use_bf16 = device.type == "cuda"  # the recipe's precision "auto"
    cfg = train_config(shape)

    mm_dtype = torch.bfloat16 if use_bf16 else torch.float32
    rate = measure_matmul_flops(device, mm_dtype, n=8192 if device.type == "cuda" else 512,
                                reps=9 if device.type == "cuda" else 3)
    rec = {"benchmark": "train", "shape": args.shape, "model_config": shape["model"], "vocab": shape["vocab"],
           "batch": shape["batch"], "seq_len": shape["seq_len"], "accum": shape["accum"],
           "tokens_per_step": shape["batch"] * shape["seq_len"] * shape["accum"],
           "checkpointing": shape["checkpointing"], "bf16": use_bf16, "warmup": shape["warmup"],
           "steps": shape["steps"], "matmul_flop_per_s": rate, "matmul_dtype": str(mm_dtype),
           "ops_backend": ops.backend_name(device), "env": env_record(device), "rows": []}
    for kind in kinds:
        print(f"... {kind}", file=sys.stderr, flush=True)
        try:
            rec["rows"].append(bench_model(kind, cfg, shape, device, shape["warmup"], shape["steps"],
                                           use_bf16, rate, profile=args.profile))
        except torch.cuda.OutOfMemoryError as e:
            rec["rows"].append({"model": kind, "layers": None, "error": f"out of memory ({str(e)[:200]})"})
        free(device)
    if not args.no_cli and args.shape == "7b":
        # Its run ends with a full checkpoint: 7.3B x (fp32 weights + two Adam moments) = 87 GB.
        rec["cli"] = None
        print("note: no `falcon-mamba train` row for the 7b shape (its final checkpoint, 87 GB, would "
              "not fit the lent machine's disk)", file=sys.stderr)
    elif not args.no_cli:
        print("... falcon-mamba train", file=sys.stderr, flush=True)
        peak = args.peak_tflops or (0.0 if device.type == "cuda" else rate / 1e12)
        work = Path(tempfile.mkdtemp(prefix="bench-train-"))
        try:
            rec["cli"] = bench_cli(shape, shape["warmup"], shape["steps"], work, peak,
                                   mamba_flops_per_token(cfg.model), rate)
        finally:
            if args.keep_cli_run:
                print(f"kept the CLI's run in {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    text = table(rec)
    print(text)
    rec["table"] = text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = (rec["env"].get("commit") or "unknown")[:7]
    path = out / f"train-{slug(rec['env']['gpu'])}-{args.shape}-{commit}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps({k: v for k, v in rec.items() if k != "table"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
