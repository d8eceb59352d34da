"""Batch-1 decode of the Falcon Mamba 7B shapes: bf16 vs int8 vs int4 weight-only quantization (GPU).

    PYTHONPATH=. python3 benchmarks/bench_quant.py [--layers 64] [--groups 128] [--json OUT.json]

(--groups 128,64,32 measures every int4 group size; each variant adds about a minute.)

Random weights, built directly on the GPU. For each variant it measures, all inside CUDA graphs
(launch overhead removed, as a graphed decoder sees it):
  linears   the weight-reading part of one token: in_proj, x_proj, dt_proj, out_proj of every layer
            (each by the faster of its module forward and the batch-1 Triton GEMV)
            and lm_head, each with its own weights (no L2 reuse across layers), batch 1;
            time per token, effective GB/s of weight bytes, and the speed-up over bf16
  step      model.step (the plain per-op decode step) captured in one CUDA graph: tokens/s
  fused     the kernel loop (decode/loop.py: the graphed fused decode step): tokens/s
  error     relative error of one decode step's logits against the bf16 model
The bf16 ceiling from ENGINEERING.md (3.01 TB/s copy bandwidth) is printed beside the linear times.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.config import PRESETS  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.quant import quantize_model  # noqa: E402
from falcon_mamba.quant.qlinear import QuantLinear  # noqa: E402

BANDWIDTH = 3.01e12  # bytes/s, H100 copy bandwidth measured in ENGINEERING.md
KINDS = ("in_proj", "x_proj", "dt_proj", "out_proj")
DECODE_MODES: dict[int, dict] = {}  # id(model) -> the kernel loop's chosen mode (time_fused)


def env() -> dict:
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "python": platform.python_version()}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    # the device copy's .git may lag the tree it runs: the caller's FALCON_MAMBA_COMMIT wins
    rec["commit"] = os.environ.get("FALCON_MAMBA_COMMIT")
    if not rec["commit"]:
        try:
            import subprocess

            rec["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
        except Exception:
            rec["commit"] = None
    return rec


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, captured once in a CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def module_bytes(mod) -> int:
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())
               if t is not None)


def _gemv_of(mod):
    """The batch-1 Triton GEMV the decoder runs for this module (ops/triton_gemv.py), or None."""
    try:
        from falcon_mamba.ops.triton_gemv import GemvWeight, fused_gemv
    except ImportError:
        return None
    w = GemvWeight.from_module(mod)
    return None if w is None else (lambda x: fused_gemv(w, x.reshape(-1)))


@torch.no_grad()
def time_linears(model) -> dict:
    """Per-token seconds of each kind of linear over all layers (inputs fixed, weights distinct)."""
    c = model.config
    dev, dt = model.device, model.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs = {"in_proj": c.hidden_size, "x_proj": c.intermediate_size, "dt_proj": c.time_step_rank,
              "out_proj": c.intermediate_size}

    def best_time(mods, x):
        """Seconds per pass over mods: the module's forward, and the batch-1 Triton GEMV of
        ops/triton_gemv.py (dense or quantized; the decoder picks the faster way, so this does too)."""
        times = {"module": graph_time(lambda: [m(x) for m in mods])}
        gemvs = [_gemv_of(m) for m in mods]
        if all(g is not None for g in gemvs):
            times["triton_gemv"] = graph_time(lambda: [g(x) for g in gemvs])
        how = min(times, key=times.get)
        return times[how], how

    out = {}
    for kind in KINDS:
        x = torch.randn(1, inputs[kind], device=dev, dtype=dt, generator=gen)
        mods = [getattr(layer.mixer, kind) for layer in model.backbone.layers]
        t, how = best_time(mods, x)
        out[kind] = {"seconds": t, "bytes": sum(module_bytes(m) for m in mods), "path": how}
    x = torch.randn(1, c.hidden_size, device=dev, dtype=dt, generator=gen)
    t, how = best_time([model.lm_head], x)
    out["lm_head"] = {"seconds": t, "bytes": module_bytes(model.lm_head), "path": how}
    total_t = sum(v["seconds"] for v in out.values())
    total_b = sum(v["bytes"] for v in out.values())
    out["total"] = {"seconds": total_t, "bytes": total_b, "path": "sum"}
    for v in out.values():
        v["GB/s"] = v["bytes"] / v["seconds"] / 1e9
    return out


@torch.no_grad()
def time_step(model) -> float:
    state = model.new_state(1)
    tok = torch.zeros(1, dtype=torch.long, device=model.device)
    return 1.0 / graph_time(lambda: model.step(tok, state))


@torch.no_grad()
def time_fused(model) -> float:
    """tok/s of the kernel loop (the graphed fused decode step; it calls the projections as
    modules, so quantized layers run their own kernels)."""
    from falcon_mamba.decode.loop import KernelLoop
    from falcon_mamba.decode.modes import DecodeOptions

    loop = KernelLoop(model, 1, DecodeOptions(tuning_cache=""))
    loop.run(3)
    torch.cuda.synchronize()
    n = 300  # tokens timed (50 left ~0.5% run-to-run noise on a 1.6x ratio)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loop.run(n)
    end.record()
    end.synchronize()
    # the decode mode the autotune kept, and every candidate's ms per step
    DECODE_MODES[id(model)] = loop.mode
    return n / (start.elapsed_time(end) / 1e3)


@torch.no_grad()
def step_logits(model, tokens: list[int]) -> torch.Tensor:
    state = model.new_state(1)
    logits = None
    for t in tokens:
        logits = model.step(torch.tensor([t], device=model.device), state)
    return logits.float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64, help="layers of the 7B shape to build (64 = full)")
    ap.add_argument("--groups", default="128", help="int4 group sizes to measure, e.g. 128,64,32")
    ap.add_argument("--no-fused", action="store_true", help="skip the kernel-loop measurement")
    ap.add_argument("--json", help="also write the JSON record to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_quant needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cfg = PRESETS["falcon-mamba-7b"].replace(num_hidden_layers=args.layers)
    with torch.device("cuda"):
        base = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (8,)).tolist()
    ref_logits = step_logits(base, tokens)
    variants = [("bf16", None, None), ("int8", 8, None)] + [
        (f"int4-g{g}", 4, int(g)) for g in args.groups.split(",") if g]
    rows = []
    for name, bits, group in variants:
        model = base if bits is None else quantize_model(copy.deepcopy(base), bits, group)
        torch.cuda.synchronize()
        rec = {"variant": name, "linears": time_linears(model), "step_tok_s": time_step(model)}
        rec["fused_tok_s"] = None if args.no_fused else time_fused(model)
        rec["decode_mode"] = DECODE_MODES.pop(id(model), None)
        lg = step_logits(model, tokens)
        rec["logits_rel_err"] = ((lg - ref_logits).norm() / ref_logits.norm()).item()
        rec["argmax_agrees"] = bool(lg.argmax() == ref_logits.argmax())
        rec["weight_bytes"] = sum(module_bytes(m) for m in model.modules()
                                  if isinstance(m, (QuantLinear, torch.nn.Linear)))
        rows.append(rec)
        print(f"{name}: fused {rec['fused_tok_s']} tok/s, step {rec['step_tok_s']:.1f} tok/s, linears "
              f"{rec['linears']['total']['seconds'] * 1e3:.3f} ms; decode mode {rec['decode_mode']}",
              flush=True)
        if model is not base:
            del model
            torch.cuda.empty_cache()
    bf = rows[0]
    print(f"Falcon Mamba 7B shapes, {args.layers} layers, batch 1, {torch.cuda.get_device_name(0)}")
    print(f"{'variant':<10} {'linears ms':>10} {'GB/s':>7} {'x bf16':>7} {'floor ms':>9} "
          f"{'step tok/s':>11} {'x bf16':>7} {'fused tok/s':>12} {'x bf16':>7} {'logit err':>10}")
    for r in rows:
        lt = r["linears"]["total"]
        floor = lt["bytes"] / BANDWIDTH  # time to read every weight byte once
        sp = bf["linears"]["total"]["seconds"] / lt["seconds"]
        st = r["step_tok_s"] / bf["step_tok_s"]
        fused = r["fused_tok_s"]
        fx = fused / bf["fused_tok_s"] if fused and bf["fused_tok_s"] else None
        r["linears_speedup"], r["step_speedup"], r["fused_speedup"] = sp, st, fx
        print(f"{r['variant']:<10} {lt['seconds'] * 1e3:>10.3f} {lt['GB/s']:>7.0f} {sp:>7.2f} "
              f"{floor * 1e3:>9.3f} {r['step_tok_s']:>11.1f} {st:>7.2f} "
              f"{(f'{fused:.1f}' if fused else '-'):>12} {(f'{fx:.2f}' if fx else '-'):>7} "
              f"{r['logits_rel_err']:>10.2e}")
    print("per kind (ms per token):")
    for r in rows:
        print(f"  {r['variant']:<10} " + "  ".join(
            f"{k} {r['linears'][k]['seconds'] * 1e3:.3f}" for k in KINDS + ("lm_head",)))
    record = {"bench": "quant_decode_batch1", "layers": args.layers, "env": env(), "rows": rows}
    line = json.dumps(record)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
