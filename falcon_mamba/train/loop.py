"""The training loop: one function, ``train(cfg, data_dir, out_dir)``, for one process or many.

Per optimizer step s: the global batch b(s) (ramp) and lr(s) (schedule x ramp scaling) are set; the
sampler draws b(s) packed rows for step s; each process takes its contiguous share and runs it in
micro-batches of ``micro_batch`` rows (gradients accumulate; DDP/FSDP2 reduce only on the last);
each micro-batch's summed loss is divided by the global number of targets times the process count,
so the reduced gradient is the mean over the global batch whatever the split. Then clip, AdamW.

Outputs in OUT: metrics.jsonl (rank 0; tokens/s and MFU of all processes together),
checkpoints/ (sharded, resumable on another process count: train/checkpoint.py), train_config.json,
and at the end model/ (HF format, with the data's tokenizer) and summary.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from falcon_mamba.data.sampler import Sampler
from falcon_mamba.data.shards import ShardSet
from falcon_mamba.errors import UserError
from falcon_mamba.train import checkpoint as ckpt
from falcon_mamba.train.build import (
    base_dtype,
    build_model,
    check_adapter_export,
    export_adapter,
    export_model,
    resolve_config,
)
from falcon_mamba.train.config import RESUMABLE_CHANGES, TrainConfig
from falcon_mamba.train.distributed import (
    Env,
    all_reduce_sum,
    local_rows,
    set_grad_sync,
    setup,
    teardown,
    wrap,
)
from falcon_mamba.train.evaluate import evaluate
from falcon_mamba.train.flops import flops_per_token, peak_flops
from falcon_mamba.train.metrics import MetricsWriter, Progress, truncate_metrics
from falcon_mamba.train.objective import LMObjective
from falcon_mamba.train.optim import build_optimizer, set_lr
from falcon_mamba.train.schedule import batch_at, check_batch_sizes, lr_at


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    model_dir: Path | None
    config: TrainConfig
    adapter_dir: Path | None = None  # the PEFT adapter folder of an adapter-only run


def _tokens_before(cfg: TrainConfig, step: int) -> int:
    return sum(batch_at(cfg, s) for s in range(step)) * cfg.seq_len


def _rng_state() -> dict:
    """Every generator a run may draw from, as tensors and ints (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(gauss)),
          "python": random.getstate()[1]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _gather(obj, env: Env) -> list:
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def _full_model_state(model: torch.nn.Module, env: Env) -> dict:
    """The whole model's state dict on rank 0's CPU (gathered from FSDP2 shards); {} elsewhere."""
    if not env.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def steps_for_budget(cfg: TrainConfig, step: int, seconds_per_row: float, seconds_left: float) -> int:
    """The total steps whose remaining rows fit ``seconds_left`` (10% kept for evals and saves),
    never more than cfg.steps and at least one more than ``step``."""
    rows_left = 0.9 * seconds_left / seconds_per_row
    s = step
    while s < cfg.steps and rows_left >= batch_at(cfg, s):
        rows_left -= batch_at(cfg, s)
        s += 1
    return max(s, step + 1)


def train(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
          model_fn: Callable | None = None, progress: bool = True, export: bool = True,
          export_dtype: torch.dtype | None = None, stop_at: int | None = None,
          log: Callable = print, save_checkpoints: bool = True, adapter_only: bool = False) -> RunResult:
    """Run (or resume) a training run; see the module docstring. ``model_fn(model_config)``
    replaces FalconMamba (the benchmark's Transformer); such runs are not exported. ``stop_at``:
    save a checkpoint after that step and return (``resume=True`` continues the same run).
    ``save_checkpoints=False`` writes no checkpoint at all (benchmarks). ``export_dtype``: the
    exported weights' dtype (default: the dtype ``init_from`` stores, else float32).
    ``adapter_only`` (LoRA runs): export OUT/adapter, a PEFT LoRA adapter folder, instead of the
    merged model OUT/model."""
    env = setup(cfg.device)
    try:
        return _train(cfg, Path(data_dir), Path(out_dir), env, resume, model_fn, progress, export,
                      export_dtype, stop_at, log if env.is_main else (lambda *a, **k: None),
                      save_checkpoints, adapter_only)
    finally:
        teardown(env)


def _train(cfg, data_dir, out_dir, env, resume, model_fn, progress, export, export_dtype, stop_at,
           log, save_checkpoints, adapter_only=False) -> RunResult:
    if adapter_only:
        check_adapter_export(cfg)  # before any work: a refused export would waste the run
    data = ShardSet(data_dir)
    if data.has_mask and not cfg.init_from:
        log("note: chat data with a fresh model; loss only on assistant tokens")
    cfg = resolve_config(cfg, data)
    check_batch_sizes(cfg, env.world)
    ck_dir = ckpt.latest_dir(out_dir)
    payload = None
    if ck_dir is not None and not resume:
        raise UserError(f"{out_dir} already holds a run ({ck_dir.relative_to(out_dir)}); pass --resume to "
                        "continue it or choose another --out")
    if resume and ck_dir is not None:
        payload = ckpt.load_train_state(ck_dir)
        saved = payload["config"]
        if cfg.time_budget_s > 0:  # the budget was resolved into `steps` by the first run
            cfg = cfg.replace(steps=saved["steps"], time_budget_s=0.0)
        diffs = ckpt.config_mismatch(saved, cfg.to_dict(), RESUMABLE_CHANGES)
        if diffs:
            raise UserError(f"{ck_dir} was saved by a run with another config; differing: "
                            f"{'; '.join(diffs[:6])}. Resume with the same recipe and --set values, "
                            "or start a new --out")
    elif resume:
        log(f"note: {out_dir} holds no checkpoint; starting a new run")
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.prune(out_dir, cfg.keep_checkpoints)  # folders left by a run killed mid-save

    model = build_model(cfg, model_fn)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
    objective = LMObjective(model, cfg.fused_loss, cfg.loss_chunk).to(env.device)
    module = wrap(objective, model, cfg.parallel, env, bf16=use_bf16)
    optimizer = build_optimizer(module, cfg)
    sampler = Sampler(data, cfg.seq_len, cfg.seed, cfg.mixture, cfg.steps)

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    start = 0
    acc = [0.0, 0]  # train-loss sum and step count since the last metrics line
    if payload is not None:
        ckpt.load_sharded(payload["folder"], model, optimizer)  # resharded to this run's processes
        sampler.load_state_dict(payload["sampler"])
        start = payload["step"]
        acc = list(payload["loss_acc"])
        if payload["world_size"] == env.world:
            _set_rng_state(payload["rng"][env.rank])
        if env.is_main:
            truncate_metrics(out_dir, start)
        log(f"resumed {out_dir} at step {start} (saved by {payload['world_size']} process(es))")
    if env.is_main:
        tmp = out_dir / "train_config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "train_config.json")
    log(f"model: {n_params:,} parameters ({n_train:,} trained); {env.world} process(es) on "
        f"{env.device}, {'bf16 autocast' if use_bf16 else 'fp32'}; {cfg.steps} steps")

    fpt = flops_per_token(model, cfg.seq_len)
    peak, peak_what = peak_flops(env.device, cfg.peak_tflops)  # one device's; tokens/s are all processes'
    if peak is not None and env.world > 1:
        peak *= env.world
        peak_what += f" x {env.world} processes"
    log(f"MFU against {peak_what}")
    metrics = MetricsWriter(out_dir, env.is_main)
    bar = Progress(cfg.steps, start, progress and env.is_main)
    tokens = _tokens_before(cfg, start)

    def save(step: int) -> None:
        """Every process: its shards and (rank 0) the run's position; see train/checkpoint.py."""
        if not save_checkpoints:
            return
        rngs = _gather(_rng_state(), env)
        ckpt.save_checkpoint(out_dir, step, model, optimizer, {
            "config": cfg.to_dict(), "sampler": sampler.state_dict(), "rng": rngs, "world_size": env.world,
            "loss_acc": list(acc), "data": {"vocab_size": data.vocab_size, "folder": str(data_dir)}},
            keep=cfg.keep_checkpoints)

    def run_eval(step: int) -> dict | None:
        res = evaluate(module, data, cfg.seq_len, cfg.micro_batch, env, autocast, cfg.eval_tokens)
        if res is not None:
            metrics.write({"step": step, "tokens": tokens, **res})
            bar.write(f"step {step}: val loss {res['val_loss']:.4f}, {res['val_bpb']:.4f} bits/byte")
        return res

    def eval_seconds(seconds_per_row: float) -> float:
        """Time the evaluations will take (a forward pass costs ~1/3 of a training step's)."""
        n_val = sum(min(len(s) - 1, cfg.eval_tokens or len(s)) for s in data.split("val").values())
        n_evals = 1 + (cfg.steps // cfg.eval_every if cfg.eval_every else 0)
        return n_evals * n_val / cfg.seq_len * seconds_per_row / 3

    per_step_loss = None
    val = None
    t_log = time.perf_counter()
    tokens_log = tokens
    budget_t0, budget_rows = None, 0
    run_t0 = time.perf_counter()
    step = start
    module.train()
    while step < cfg.steps:
        B = batch_at(cfg, step)
        lr = lr_at(cfg, step)
        set_lr(optimizer, lr)
        picks = sampler.next_batch(step, B)  # the global batch: the same on every process
        batch = sampler.load(local_rows(picks, env.rank, env.world))
        per = len(batch.input_ids)
        n_global = all_reduce_sum(torch.tensor(float(batch.num_targets), device=env.device), env).item()
        scale = env.world / max(1.0, n_global)
        loss_sum = torch.zeros((), device=env.device)
        micros = range(0, per, cfg.micro_batch)
        for i, lo in enumerate(micros):
            mb = batch.rows(lo, lo + cfg.micro_batch).to(env.device)
            sync = cfg.sync_every_micro_batch or i == len(micros) - 1
            ctx = set_grad_sync(module, sync) if env.distributed else contextlib.nullcontext()
            with ctx:
                with autocast():
                    ls = module(mb.input_ids, mb.targets, mb.reset, mb.loss_mask)
                (ls * scale).backward()
            loss_sum += ls.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in module.parameters() if p.grad is not None], max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_step_loss = all_reduce_sum(loss_sum, env).item() / max(1.0, n_global)
        if not math.isfinite(per_step_loss):
            raise RuntimeError(f"the loss became {per_step_loss} at step {step}; lower lr or check the data")
        step += 1
        tokens += B * cfg.seq_len
        acc[0] += per_step_loss
        acc[1] += 1

        # ---- time budget: fix the number of steps once the speed is known -----------------------
        if cfg.time_budget_s > 0:
            if step == start + 3:
                budget_t0, budget_rows = time.perf_counter(), 0
            elif budget_t0 is not None:
                budget_rows += B
                if step == start + 23 or step == cfg.steps:
                    spr = (time.perf_counter() - budget_t0) / max(1, budget_rows)
                    left = cfg.time_budget_s - (time.perf_counter() - run_t0) - eval_seconds(spr)
                    new = torch.tensor(float(steps_for_budget(cfg, step, spr, left)), device=env.device)
                    if env.distributed:  # every process must agree: take rank 0's figure
                        import torch.distributed as dist

                        dist.broadcast(new, 0)
                    cfg = cfg.replace(steps=int(new.item()), time_budget_s=0.0)
                    sampler.total_steps = cfg.steps
                    bar.set_total(cfg.steps)
                    log(f"time budget: {spr * 1e3:.2f} ms per sequence -> {cfg.steps} steps")
                    if env.is_main:
                        tmp = out_dir / "train_config.json.tmp"
                        tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
                        os.replace(tmp, out_dir / "train_config.json")

        row = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            tok_s = (tokens - tokens_log) / max(1e-9, now - t_log)
            row = {"step": step, "tokens": tokens, "loss": acc[0] / acc[1], "lr": lr, "batch": B,
                   "tok_s": tok_s, "mfu": None if peak is None else tok_s * fpt / peak,
                   "grad_norm": float(grad_norm), "epochs": sampler.epochs_done(),
                   "elapsed_s": now - run_t0}
            metrics.write(row)
            acc = [0.0, 0]
            t_log, tokens_log = now, tokens
        bar.update(1, row)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
        if step == stop_at and step < cfg.steps:
            save(step)
            bar.close()
            metrics.close()
            log(f"stopped after step {step}; --resume continues")
            return RunResult(out_dir, step, tokens, per_step_loss, None, None, None, cfg)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save(step)
    bar.close()
    val = run_eval(step)
    if step > start or payload is None:  # a finished run resumed again has nothing new to save
        save(step)
    metrics.close()
    model_dir = adapter_dir = None
    if export and model_fn is None:
        model_state = _full_model_state(model, env)  # every process takes part; rank 0 gets it
        if env.is_main:
            if adapter_only:
                adapter_dir = export_adapter(cfg, model_state, out_dir / "adapter")
                log(f"exported the PEFT adapter {adapter_dir}")
            else:
                dtype = export_dtype or base_dtype(cfg)
                model_dir = export_model(cfg, model_state, out_dir / "model", data.folder, dtype)
                log(f"exported {model_dir} ({str(dtype).removeprefix('torch.')})")
    result = RunResult(out_dir, step, tokens, per_step_loss, None if val is None else val["val_loss"],
                       None if val is None else val["val_bpb"], model_dir, cfg, adapter_dir)
    if env.is_main:
        summary = {"steps": step, "tokens": tokens, "train_loss": per_step_loss,
                   "val_loss": result.val_loss, "val_bpb": result.val_bpb, "parameters": n_params,
                   "processes": env.world, "device": str(env.device)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if val is not None:
            log(f"done: step {step}, val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits/byte")
    return result
