"""transformers' FalconMamba with and without ``falcon_mamba.hf.accelerate``, in one run.

    PYTHONPATH=. python3 benchmarks/bench_hf_accelerate.py [--threads 1] [--json OUT.json]   # CPU
    PYTHONPATH=. python3 benchmarks/bench_hf_accelerate.py --gpu [--json OUT.json]           # GPU, ~4 min

CPU: a training step (forward + loss + backward, ``model(ids, labels=ids).loss.backward()``) of an
~18M-parameter FalconMambaForCausalLM (H 384, 12 layers, D 768, vocab 8192), batch 4 x 64 and
4 x 128, transformers' own path vs the same model object after accelerate().

GPU (random weights, bf16, the paths a transformers user runs):
- ``generate`` decode at the 7B shapes (H 4096, 64 layers, D 8192, vocab 65024), greedy, batch 1
  and 64: tok/s from two generate calls of different lengths (their difference is pure decode);
- a training step of the ~1.5B shape (H 2048, 48 layers, D 4096, N 16, dt rank 128, vocab 65024),
  batch 8: transformers' path at 8 x 256, the accelerated model at 8 x 256 and 8 x 2048, all with
  activation checkpointing (transformers' scan materialises (B, D, L, N) fp32 tensors per layer,
  4.3 GB each at 8 x 2048, so without it the model does not fit), and the accelerated one at
  8 x 2048 without it too.

Why transformers' path is timed at shorter lengths: its torch scan indexes one time step of a
(B, D, L, N) tensor per step, and the backward of each index allocates and adds a zero tensor of
the whole (B, D, L, N) shape, so a backward pass moves O(B D N L^2) bytes: measured on the CPU
(one layer, H 128, batch 4), 0.4 / 1.3 / 4.8 / 64.6 s for L = 64 / 128 / 256 / 512. On the
1.5B shape each of the L steps writes at least two zero tensors of B x 4096 x L x 16 fp32 per layer:
>= 17.6 TB per layer at 8 x 2048 (>= 3 minutes a step at 4 TB/s), >= 1.1 TB at 8 x 512. The
speed-up therefore grows with the length; the figures at equal lengths (8 x 256) are the fair
comparison, and a lower bound for longer rows.

Each part also records whether both paths agree (the loss, the greedy tokens). A part that would overrun the
time budget (--budget-s) is skipped and says so; the JSON is rewritten after every part, so a
killed run keeps what it measured. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import falcon_mamba.hf as fh  # noqa: E402

SHAPES = {  # FalconMambaConfig fields
    "cpu-18m": dict(hidden_size=384, num_hidden_layers=12, intermediate_size=768, state_size=16,
                    time_step_rank=24, vocab_size=8192),
    "1.5b": dict(hidden_size=2048, num_hidden_layers=48, intermediate_size=4096, state_size=16,
                 time_step_rank=128, vocab_size=65024),
    "7b": dict(hidden_size=4096, num_hidden_layers=64, intermediate_size=8192, state_size=16,
               time_step_rank=256, vocab_size=65024),
}
T0 = time.perf_counter()


def env() -> dict:
    import transformers

    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
           or "cpu", "cpu_threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0],
           "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    # the device copy's .git may lag the tree it runs: the caller's FALCON_MAMBA_COMMIT wins
    rec["commit"] = os.environ.get("FALCON_MAMBA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(__file__)).stdout.strip() or None
    return rec


def build(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    """A random transformers FalconMambaForCausalLM, initialised by transformers, on device."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.FalconMambaConfig(tie_word_embeddings=False, **SHAPES[shape])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: a 7B fp32 copy never exists
    try:
        with torch.device(device):
            model = transformers.FalconMambaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def set_checkpointing(model, on: bool) -> None:
    """transformers' activation checkpointing (the newer method names where they exist)."""
    verb = "enable" if on else "disable"
    fn = (getattr(model, f"activation_checkpointing_{verb}", None)
          or getattr(model, f"gradient_checkpointing_{verb}"))
    fn(**({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if on else {}))


def train_step(model, ids) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item()


def time_train(model, ids, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, loss of the first step)."""
    loss = None
    for _ in range(warmup):
        loss = train_step(model, ids)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step_loss = train_step(model, ids)
        loss = step_loss if loss is None else loss
    sync()
    return (time.perf_counter() - t) / steps, loss


def generate(model, prompt, n: int):
    sync()
    t = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - t, out[:, prompt.shape[1]:]


def first_steps_logits(model, prompt, n: int = 3) -> list[torch.Tensor]:
    """The logits (B, V) fp32 of generate's first n steps (the prompt's, then decode steps)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return [x.float() for x in out.logits]


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the number of greedy tokens equal before the first difference (random
    weights give near-flat logits, so one rounding flip changes every later token)."""
    diff = (a != b).int()
    n = a.shape[1]
    return torch.where(diff.any(1), diff.argmax(1), torch.full_like(diff[:, 0], n)).float().mean().item()


def decode_rate(model, prompt, short: int, long: int) -> tuple[float, torch.Tensor]:
    """Decode tokens/s (all rows) from generate(long) - generate(short), and generate(long)'s tokens."""
    generate(model, prompt, 2)  # warm-up: allocator, kernels
    t_short, _ = generate(model, prompt, short)
    t_long, toks = generate(model, prompt, long)
    return prompt.shape[0] * (long - short) / (t_long - t_short), toks


class Report:
    def __init__(self, path: str | None, budget_s: float):
        self.path, self.budget_s = path, budget_s
        self.rec = {"env": env(), "parts": {}, "skipped": []}
        self.rows: list[tuple[str, str, str]] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - T0)

    def skip(self, part: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return False
        self.rec["skipped"].append(f"{part}: needs ~{need_s:.0f} s, {self.left():.0f} s of the budget left")
        print(f"skipped {part} (needs ~{need_s:.0f} s, {self.left():.0f} s left)", flush=True)
        self.save()
        return True

    def add(self, part: str, data: dict, rows: list[tuple[str, str, str]]) -> None:
        self.rec["parts"][part] = data
        self.rows += rows
        for r in rows:
            print(f"{r[0]:<58} {r[1]:>14} {r[2]}", flush=True)
        self.save()

    def save(self) -> None:
        self.rec["wall_s"] = round(time.perf_counter() - T0, 1)
        if self.path:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.rec, f, indent=2)

    def finish(self) -> None:
        self.rec["env"]["load_average_1m_end"] = os.getloadavg()[0]
        print(f"\n{'what':<58} {'value':>14} note")
        for r in self.rows:
            print(f"{r[0]:<58} {r[1]:>14} {r[2]}")
        self.save()
        print(json.dumps(self.rec))


def part_train(rep: Report, shape: str, device: str, dtype, batch: int, hf_lens: list[int],
               acc_lens: list[int], steps: int, hf_steps: int, checkpointing: bool, plain_too: bool) -> None:
    """Training steps of one model: transformers' path at hf_lens, then the same model object
    accelerated at acc_lens (and without checkpointing at the longest, with plain_too)."""
    log(f"building {shape} ({dtype}, {device})")
    model = build(shape, dtype, device)
    model.train()
    n = params(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, max(acc_lens + hf_lens)), generator=g).to(device)
    mode = "activation checkpointing" if checkpointing else "no checkpointing"
    if checkpointing:
        set_checkpointing(model, True)
    data = {"shape": shape, "parameters": n, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "mode": mode, "by_seq_len": {}}
    rows = []
    what = f"train step {shape} ({n / 1e6:,.1f}M), {mode}, batch {batch}"
    # transformers' path: one small warm-up step, not a full one (one full step is the slow part).
    train_step(model, ids[:1, :16])
    for L in hf_lens:
        log(f"transformers' path, {batch} x {L}")
        t, loss = time_train(model, ids[:, :L], hf_steps, 0)
        data["by_seq_len"][L] = {"transformers_s_per_step": t, "transformers_tok_s": batch * L / t,
                                 "loss_transformers": loss}
        rows.append((f"{what} x {L}: transformers", f"{batch * L / t:,.0f} tok/s", f"{t:.3f} s/step"))
    fh.accelerate(model)
    for L in acc_lens:
        log(f"accelerated, {batch} x {L}")
        t, loss = time_train(model, ids[:, :L], steps, 1)
        d = data["by_seq_len"].setdefault(L, {})
        d |= {"accelerated_s_per_step": t, "accelerated_tok_s": batch * L / t, "loss_accelerated": loss}
        note = f"{t:.3f} s/step"
        if "transformers_s_per_step" in d:
            d["speedup"] = d["transformers_s_per_step"] / t
            d["loss_rel_diff"] = abs(loss - d["loss_transformers"]) / abs(d["loss_transformers"])
            note += f", {d['speedup']:.1f}x; loss rel diff {d['loss_rel_diff']:.1e}"
        rows.append((f"{what} x {L}: accelerated", f"{batch * L / t:,.0f} tok/s", note))
    if plain_too:
        L = max(acc_lens)
        set_checkpointing(model, False)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, _ = time_train(model, ids[:, :L], steps, 1)
        d = data["by_seq_len"][L]
        d |= {"accelerated_no_checkpointing_s_per_step": t,
              "accelerated_no_checkpointing_tok_s": batch * L / t}
        note = f"{t:.3f} s/step"
        if device == "cuda":
            d["accelerated_no_checkpointing_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            note += f", peak {d['accelerated_no_checkpointing_peak_gb']:.0f} GB"
        rows.append((f"train step {shape}, no checkpointing, batch {batch} x {L}: accelerated",
                     f"{batch * L / t:,.0f} tok/s", note))
    rep.add(f"train-{shape}", data, rows)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def part_decode(rep: Report, batches: list[int], prompt_len: int, short: int, long: int) -> None:
    log("building 7b (bf16, cuda)")
    model = build("7b", torch.bfloat16, "cuda").eval()
    n = params(model)
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=g).cuda()
               for b in batches}
    hf, hf_logits = {}, {}
    for b in batches:
        log(f"generate, transformers' path, batch {b}")
        hf[b] = decode_rate(model, prompts[b], short, long)
        hf_logits[b] = first_steps_logits(model, prompts[b])
    fh.accelerate(model)
    data, rows = {"shape": "7b", "parameters": n, "prompt_len": prompt_len,
                  "tokens_timed": long - short}, []
    for b in batches:
        log(f"generate, accelerated, batch {b}")
        r_acc, toks = decode_rate(model, prompts[b], short, long)
        r_hf, toks_hf = hf[b]
        same = (toks == toks_hf).float().mean().item()
        # the logits of the first steps, prompt then decode (both paths chose the same tokens there
        # unless the first divergence is earlier): max |diff| / max |logit| per step
        errs = [((x - y).abs().max() / y.abs().max()).item()
                for x, y in zip(first_steps_logits(model, prompts[b]), hf_logits[b])]
        div = first_divergence(toks, toks_hf)
        data[f"batch{b}"] = {"transformers_tok_s": r_hf, "accelerated_tok_s": r_acc,
                             "speedup": r_acc / r_hf, "greedy_tokens_equal_fraction": same,
                             "tokens_before_first_difference_mean": div,
                             "first_steps_logits_rel_err": errs}
        rows += [(f"generate decode 7B bf16, batch {b}: transformers", f"{r_hf:,.1f} tok/s", ""),
                 (f"generate decode 7B bf16, batch {b}: accelerated", f"{r_acc:,.1f} tok/s",
                  f"{r_acc / r_hf:.1f}x; equal tokens before the first difference {div:.1f} of "
                  f"{toks.shape[1]}; logits rel err of the first steps "
                  + ", ".join(f"{e:.1e}" for e in errs))]
    rep.add("decode-7b", data, rows)
    del model
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU parts (7B decode, 1.5B training step)")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after each part)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="skip parts that would overrun it")
    ap.add_argument("--batch", type=int, default=None, help="training batch (CPU 4, GPU 8)")
    ap.add_argument("--hf-seq-lens", default=None,
                    help="training lengths of transformers' path (CPU 64,128; GPU 256)")
    ap.add_argument("--seq-lens", default=None,
                    help="training lengths of the accelerated model (CPU 64,128; GPU 256,2048)")
    ap.add_argument("--steps", type=int, default=None, help="timed accelerated steps (CPU 2, GPU 3)")
    ap.add_argument("--hf-steps", type=int, default=1, help="timed steps of transformers' path")
    ap.add_argument("--decode-batches", default="1,64", help="GPU decode batch sizes")
    ap.add_argument("--parts", default="decode,train", help="GPU parts to run (decode, train)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default torch's; on a shared machine 1 avoids oversubscription)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = Report(args.json, args.budget_s)
    lens = lambda text, default: [int(x) for x in (text or default).split(",")]
    if not args.gpu:
        part_train(rep, "cpu-18m", "cpu", torch.float32, args.batch or 4, lens(args.hf_seq_lens, "64,128"),
                   lens(args.seq_lens, "64,128"), args.steps or 2, args.hf_steps, checkpointing=False,
                   plain_too=False)
    else:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here", file=sys.stderr)
            return 2
        batches = [int(b) for b in args.decode_batches.split(",")]
        parts = set(args.parts.split(","))
        if parts - {"decode", "train"}:
            ap.error(f"--parts: unknown {', '.join(sorted(parts - {'decode', 'train'}))} (decode, train)")
        if "decode" in parts and not rep.skip("decode-7b", 60):
            part_decode(rep, batches, prompt_len=16, short=4, long=68)
        if "train" in parts and not rep.skip("train-1.5b", 100):
            part_train(rep, "1.5b", "cuda", torch.bfloat16, args.batch or 8, lens(args.hf_seq_lens, "256"),
                       lens(args.seq_lens, "256,2048"), args.steps or 3, args.hf_steps,
                       checkpointing=True, plain_too=True)
    rep.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
