"""Data-parallel scaling of `falcon-mamba train` on one node's GPUs (torchrun, NCCL), through the
training loop a user runs (falcon_mamba.train.train; no checkpoint or export is written).

    python3 benchmarks/bench_scaling.py                      # everything below, on up to 8 GPUs
    python3 benchmarks/bench_scaling.py --part 1.5b --gpus 1,2,4,8 --modes ddp,fsdp
    python3 benchmarks/bench_scaling.py --part 7b            # the 7B recipe on 8 GPUs only
    python3 benchmarks/bench_scaling.py --memory-table       # the README's memory-per-GPU table (no GPU)
    python3 benchmarks/bench_scaling.py --smoke              # the whole path on the CPU (gloo, tiny model)

1. Weak scaling of the ~1.5B shape (H 2048, D 4096, 48 layers, vocab 65024: 1.53B parameters): the
   same rows per GPU at every GPU count (8 x 2048 tokens, one micro-batch), DDP by default; tokens/s
   of all GPUs against N x the 1-GPU figure (the issue's bar: >= 90% of linear at 8 GPUs).
2. The Falcon Mamba 7B recipe on 8 GPUs: FSDP2 (in_proj/out_proj gathered in bf16), activation
   checkpointing, bf16 autocast, gradient accumulation over micro-batches; tokens/s and MFU.

Each point is one torchrun launch of this file (``--worker``) with ``--nproc_per_node N``; NCCL's
environment is left as the machine sets it. The data are random token ids written as a prepared data
folder (the text does not change the speed). Per run: tokens/s over the steps after ``--warmup``
(from metrics.jsonl: tokens / elapsed time), MFU (the loop's: against N x the bf16 matmul rate it
measures at the start), step time and each GPU's peak allocated memory. Output in --out (default
$OUT, else benchmarks/results): scaling-<gpu>-<commit>.json (rewritten after every run, so a
cut-off call keeps what it finished) and .png; the table is printed, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPE_15B = {"model.hidden_size": 2048, "model.intermediate_size": 4096, "model.num_hidden_layers": 48,
             "model.state_size": 16, "model.time_step_rank": 128}
VOCAB = 65024
EOS = 11


# ---- the memory model (README: training at scale) -------------------------------------------------
def memory_per_gpu(n_params: int, gpus: int, mode: str, low_precision_params: int = 0,
                   root_params: int = 0, accumulate: bool = True) -> dict:
    """Bytes per GPU of the training state (no activations) of a model of ``n_params``: fp32 master
    weights (4 B), fp32 gradients (4 B), AdamW's two fp32 moments (8 B), plus what each mode adds.

    ddp: everything replicated; bf16 autocast keeps a bf16 copy of every weight from the forward
    to the backward (2 B). fsdp: the 16 B are sharded over ``gpus``; the root unit (embeddings,
    lm_head, norms: ``root_params``) is gathered in fp32 for the whole step, two units of the largest
    layer in flight are ignored (<1 GB); gradient accumulation without a sync per micro-batch keeps
    unsharded fp32 gradients (4 B per parameter) until the step's one reduce-scatter."""
    P = n_params
    if mode == "ddp":
        return {"params": 4 * P, "grads": 4 * P, "adam": 8 * P, "other": 2 * P}
    other = 4 * root_params + (4 * P if accumulate else 0)
    return {"params": 4 * P / gpus, "grads": 4 * P / gpus, "adam": 8 * P / gpus, "other": other}


def memory_table() -> str:
    from falcon_mamba.config import PRESETS

    c = PRESETS["falcon-mamba-7b"]
    P = c.num_parameters
    root = 2 * c.vocab_size * c.hidden_size + (c.num_hidden_layers + 1) * c.hidden_size
    low = c.num_hidden_layers * 3 * c.hidden_size * c.intermediate_size  # in_proj (H x 2D) + out_proj (D x H)
    gb = 1e9
    rows = ["| mode | GPUs | weights | gradients | AdamW m, v | more | total per GPU |",
            "|---|---|---|---|---|---|---|"]
    cases = [("DDP (or 1 GPU)", "ddp", 1, True, "bf16 weight copies")]
    for n in (2, 4, 8):
        cases.append((f"FSDP2, {n} GPUs", "fsdp", n, True, "root unit + unsharded grads"))
    cases.append(("FSDP2, 8 GPUs, sync_every_micro_batch", "fsdp", 8, False, "root unit"))
    for label, mode, n, acc, what in cases:
        m = memory_per_gpu(P, n, mode, low, root, acc)
        total = sum(m.values())
        rows.append(f"| {label} | {n if mode == 'fsdp' else 'any'} | {m['params'] / gb:.1f} | "
                    f"{m['grads'] / gb:.1f} | {m['adam'] / gb:.1f} | {m['other'] / gb:.1f} ({what}) | "
                    f"{total / gb:.1f} GB |")
    rows.append("")
    rows.append(f"Falcon Mamba 7B: {P:,} parameters; in_proj + out_proj {low / P:.0%} of them (gathered in "
                f"bf16 by FSDP2); embeddings + lm_head + norms {root:,} (the root unit). GB = 1e9 bytes; "
                "activations come on top (measured: bench_scaling.py).")
    return "\n".join(rows)


# ---- data ---------------------------------------------------------------------------------------------
def make_data(folder: Path, train_tokens: int, val_tokens: int = 16_384, seed: int = 0) -> Path:
    """A prepared data folder of random ids (documents of 1-8k tokens, each ending in eos)."""
    import shutil

    import numpy as np

    from falcon_mamba.data.shards import FORMAT, ShardWriter

    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        if meta["sources"]["random"]["train"]["tokens"] >= train_tokens:
            return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entry = {"files": ["(random ids)"]}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        w = ShardWriter(folder, split, "random", "uint16", with_mask=False)
        done = 0
        while done < n:
            k = int(min(n - done, rng.integers(1024, 8192)))
            ids = rng.integers(12, VOCAB, size=k, dtype=np.int64)
            ids[-1] = EOS
            w.add(ids.tolist(), nbytes=4 * k)
            done += k
        entry[split] = w.close()
    # The folder format needs a tokenizer; only its bos id is read (the ids are random anyway).
    shutil.copyfile(ROOT / "falcon_mamba" / "default_model" / "tokenizer.json", folder / "tokenizer.json")
    meta = {"format": FORMAT, "dtype": "uint16", "vocab_size": VOCAB, "eos_token_id": EOS, "chat": False,
            "val_fraction": 0.0, "tokenizer": "random ids", "sources": {"random": entry}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


# ---- one torchrun process ------------------------------------------------------------------------------
def worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from falcon_mamba.train import apply_overrides, get_recipe, train
    from falcon_mamba.train.metrics import read_metrics

    spec = json.loads(Path(spec_path).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # torchrun sets OMP_NUM_THREADS=1; building the model on the CPU wants the node's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or world) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                         world)))))
    cfg = apply_overrides(get_recipe(spec["preset"]), spec["sets"])
    if world > 1:
        if spec["device"] == "cuda":
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    t0 = time.perf_counter()
    res = train(cfg, spec["data"], spec["run"], progress=False, export=False, save_checkpoints=False,
                log=print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None))
    wall = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 1e9 if spec["device"] == "cuda" else 0.0
    mems = [None] * world
    if world > 1:
        dist.all_gather_object(mems, mem)
        dist.destroy_process_group()
    else:
        mems = [mem]
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rows = [r for r in read_metrics(spec["run"]) if "tok_s" in r]
    w = spec["warmup"]
    if len(rows) <= w:
        raise SystemExit(f"only {len(rows)} steps logged; run more --steps than --warmup {w}")
    a, b = rows[w - 1], rows[-1]
    tok_s = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
    mfus = sorted(r["mfu"] for r in rows[w:] if r["mfu"] is not None)
    steps, seconds = b["step"] - a["step"], b["elapsed_s"] - a["elapsed_s"]
    out = {"tok_s": tok_s, "tok_s_per_gpu": tok_s / world, "step_s": seconds / steps,
           "mfu": mfus[len(mfus) // 2] if mfus else None, "steps_measured": steps,
           "tokens_per_step": rows[-1]["batch"] * res.config.seq_len, "peak_mem_gb": mems, "wall_s": wall,
           "parameters": res.config.model.num_parameters, "final_loss": rows[-1]["loss"]}
    Path(spec["result"]).write_text(json.dumps(out) + "\n")


# ---- the driver ------------------------------------------------------------------------------------------
def _commit() -> str:
    for key in ("FALCON_MAMBA_COMMIT", "GIT_COMMIT"):
        if os.environ.get(key):
            return os.environ[key]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def launch(n: int, spec: dict, work: Path, timeout: float) -> dict | None:
    name = f"{spec['name']}-{n}"
    spec = {**spec, "run": str(work / "runs" / name), "result": str(work / f"{name}.json")}
    import shutil

    shutil.rmtree(spec["run"], ignore_errors=True)
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           __file__, "--worker", str(spec_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        print(f"{name}: failed (rc {proc.returncode}); last lines:\n{(proc.stdout + proc.stderr)[-3000:]}",
              file=sys.stderr)
        return None
    r = json.loads(Path(spec["result"]).read_text())
    print(f"{name}: {r['tok_s']:,.0f} tok/s ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return r


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax7) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for mode, color in (("ddp", "C0"), ("fsdp", "C1")):
        pts = sorted((r["gpus"], r["tok_s"], r["efficiency"]) for r in record["runs"]
                     if r["part"] == "1.5b" and r["mode"] == mode)
        if not pts:
            continue
        g = [p[0] for p in pts]
        ax.plot(g, [p[1] for p in pts], "o-", color=color, label=f"{mode.upper()} measured")
        base = next((r["tok_s"] for r in record["runs"] if r["part"] == "1.5b" and r["mode"] == mode
                     and r["gpus"] == 1), None)
        if base:
            ax.plot(g, [base * x for x in g], "--", color=color, alpha=0.5, label=f"{mode.upper()} linear")
        for x, y, e in pts:
            if e is not None:
                ax.annotate(f"{100 * e:.0f}%", (x, y), textcoords="offset points", xytext=(4, -12),
                            fontsize=8)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["gpus"] for r in record["runs"] if r["part"] == "1.5b"})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s (all GPUs)")
    ax.set_title("~1.5B weak scaling, same rows per GPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    seven = [r for r in record["runs"] if r["part"] == "7b"]
    if seven:
        r = seven[-1]
        ax7.bar(["tokens/s per GPU"], [r["tok_s_per_gpu"]], color="C2")
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ax7.set_title(f"7B, FSDP2 + AC, {r['gpus']} GPUs\n{r['tok_s']:,.0f} tok/s, MFU {mfu}")
    else:
        ax7.set_axis_off()
    fig.suptitle(f"{record['gpu']}, torch {record['torch']}, commit {record['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("all", "1.5b", "7b"), default="all")
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts for the 1.5B (those the node has)")
    p.add_argument("--modes", default="ddp", help="ddp, fsdp or ddp,fsdp for the 1.5B")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per 1.5B run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the figures (compile, autotune)")
    p.add_argument("--rows-per-gpu", type=int, default=8, help="1.5B: sequences of 2048 per GPU per step")
    p.add_argument("--steps-7b", type=int, default=8)
    p.add_argument("--micro-7b", type=int, default=2, help="7B: rows per micro-batch")
    p.add_argument("--accum-7b", type=int, default=2, help="7B: micro-batches per step and GPU")
    p.add_argument("--gpus-7b", type=int, default=8)
    p.add_argument("--timeout", type=float, default=420, help="seconds per torchrun launch")
    p.add_argument("--work", default="/tmp/falcon-mamba-scaling", help="data, runs and logs")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--memory-table", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 1 and 2 processes")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.memory_table:
        print(memory_table())
        return 0

    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        device, have = "cpu", 2
        gpu = "cpu (smoke)"
        shape = {"model.hidden_size": 64, "model.intermediate_size": 128, "model.num_hidden_layers": 2,
                 "model.state_size": 4}
        seq, rows_per_gpu, steps = 64, 2, max(args.warmup + 2, 4)
        counts = [1, 2]
        parts = ["1.5b", "7b"]  # "7b": the recipe's code path (FSDP2, AC, accumulation) on the tiny shape
        args.gpus_7b, args.steps_7b = 2, steps
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run on the GPU node (or --smoke / --memory-table)", file=sys.stderr)
            return 2
        device, have = "cuda", torch.cuda.device_count()
        gpu = torch.cuda.get_device_name(0)
        shape, seq, rows_per_gpu, steps = SHAPE_15B, 2048, args.rows_per_gpu, args.steps
        counts = [n for n in (int(x) for x in args.gpus.split(",")) if n <= have]
        parts = ["1.5b", "7b"] if args.part == "all" else [args.part]
    need = max(counts) * rows_per_gpu * (seq + 1) * steps
    if "7b" in parts:
        need = max(need, args.gpus_7b * args.micro_7b * args.accum_7b * 2049 * args.steps_7b)
    data = make_data(work / "data", train_tokens=need + 1_000_000)

    record = {"gpu": gpu, "gpus_on_node": have, "torch": torch.__version__, "commit": _commit(),
              "date": time.strftime("%Y-%m-%d"), "runs": []}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    name = f"scaling-{'smoke' if args.smoke else gpu.split()[-1].lower()}-{record['commit']}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            plot(record, out / f"{name}.png")
        except ImportError:
            print("no matplotlib: no plot", file=sys.stderr)

    common = {"device": device, "data": str(data), "warmup": args.warmup}
    if "1.5b" in parts:
        for mode in args.modes.split(","):
            base = None
            for n in counts:
                sets = [f"{k}={v}" for k, v in shape.items()] + [
                    f"seq_len={seq}", f"global_batch={rows_per_gpu * n}", f"micro_batch={rows_per_gpu}",
                    f"steps={steps}", "batch_ramp_start=0", "warmup_steps=2", "eval_every=0",
                    "eval_tokens=2048", "log_every=1", f"parallel={mode}", f"device={device}",
                    "precision=bf16" if device == "cuda" else "precision=fp32"]
                r = launch(n, {**common, "name": f"1.5b-{mode}", "preset": "tiny", "sets": sets}, work,
                           args.timeout)
                if r is None:
                    continue
                if n == 1:
                    base = r["tok_s"]
                r.update(part="1.5b", mode=mode, gpus=n, rows_per_gpu=rows_per_gpu, seq_len=seq,
                         efficiency=None if base is None else r["tok_s"] / (n * base))
                record["runs"].append(r)
                save()
    if "7b" in parts and args.gpus_7b <= have:
        n = args.gpus_7b
        sets = [f"global_batch={n * args.micro_7b * args.accum_7b}", f"micro_batch={args.micro_7b}",
                f"steps={args.steps_7b}", "batch_ramp_start=0", "warmup_steps=2", "eval_every=0",
                "eval_tokens=2048", "log_every=1", "parallel=fsdp", "activation_checkpointing=true",
                "precision=bf16", f"device={device}"]
        if args.smoke:
            sets += [f"{k}={v}" for k, v in shape.items()] + [f"seq_len={seq}"]
        r = launch(n, {**common, "name": "7b-fsdp-ac", "preset": "falcon-mamba-7b", "sets": sets,
                       "warmup": min(args.warmup, args.steps_7b - 2)}, work, args.timeout)
        if r is not None:
            r.update(part="7b", mode="fsdp", gpus=n, micro_batch=args.micro_7b, accumulation=args.accum_7b,
                     seq_len=seq if args.smoke else 2048, efficiency=None)
            record["runs"].append(r)
            save()
    save()
    print("| part | mode | GPUs | tokens/s | per GPU | of linear | MFU | step s | peak GB (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in record["runs"]:
        eff = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['part']} | {r['mode']} | {r['gpus']} | {r['tok_s']:,.0f} | {r['tok_s_per_gpu']:,.0f} | "
              f"{eff} | {mfu} | {r['step_s']:.3f} | {max(r['peak_mem_gb']):.1f} |")
    print(json.dumps(record))
    return 0 if record["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
