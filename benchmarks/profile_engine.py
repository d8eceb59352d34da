"""Where the serving engine's time goes (GPU): the engine driven in this thread (no HTTP) on a
random 7B-shaped model, under cProfile, for two loads; prints per-phase times and the top
functions by own and cumulative time.

    PYTHONPATH=. python3 benchmarks/profile_engine.py [--layers 64] [--slots 256] [--out F.json]

  burst   N short prompts (~27 tokens) at once, 64 tokens each (greedy): wall, time to the first
          token of each request, output tok/s
  mixed   32 streams decoding while one 20k-token prompt is read in chunks: time per engine step
  wave    (--wave 256,...) that many ~27-token requests at once, 128 tokens each, as the server's
          sweep starts: each step's time (synchronised), decode rows and prompts read, and the first
          --trace-steps steps that read prompts under torch.profiler (kernels by GPU time, ops by
          host time, the GPU's busy time against the steps' wall)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.config import get_preset  # noqa: E402
from falcon_mamba.engine.engine import Engine, EngineConfig  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.sampling import SamplingParams  # noqa: E402
from falcon_mamba.tokenizer import load_tokenizer  # noqa: E402


def top(prof, n=25) -> str:
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(n)
    st.sort_stats("cumulative").print_stats(n)
    return s.getvalue()


def burst(eng, n_req, gen, prof):
    V = eng.model.config.vocab_size
    times = {}
    reqs = []
    t0 = time.perf_counter()
    for i in range(n_req):
        ids = torch.randint(100, V, (27,), generator=gen).tolist()

        def sink(deltas, i=i):
            if i not in times and any(d.token_ids for d in deltas):
                times[i] = time.perf_counter() - t0
        reqs.append(eng.submit(ids, SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True),
                               sink=sink))
    prof.enable()
    eng.run_until(lambda: all(r.finished for r in reqs))
    prof.disable()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ttft = sorted(times.values())
    return {"requests": n_req, "wall_s": wall, "tok_s": n_req * 64 / wall,
            "ttft_p50": ttft[len(ttft) // 2], "ttft_max": ttft[-1]}


def mixed(eng, gen, prof, long_tokens=20000):
    V = eng.model.config.vocab_size
    reqs = [eng.submit(torch.randint(100, V, (27,), generator=gen).tolist(),
                       SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True))
            for _ in range(32)]
    for _ in range(20):  # all decoding
        eng.run_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        eng.run_step()
    torch.cuda.synchronize()
    alone = (time.perf_counter() - t0) / 50
    long = eng.submit(torch.randint(100, V, (long_tokens,), generator=gen).tolist(),
                      SamplingParams(max_new_tokens=1, temperature=0.0))
    prof.enable()
    t0 = time.perf_counter()
    steps = 0
    while not long.finished:
        eng.run_step()
        steps += 1
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    prof.disable()
    for r in reqs:
        eng.cancel(r)
    eng.run_until(lambda: True)
    return {"step_ms_alone": alone * 1e3, "steps_with_prompt": steps, "step_ms_with_prompt": dt / steps * 1e3,
            "prompt_tok_s": long_tokens / dt}


def wave(eng, n_req, gen, trace_steps):
    from torch.profiler import ProfilerActivity, profile

    V = eng.model.config.vocab_size
    reqs = [eng.submit(torch.randint(100, V, (27,), generator=gen).tolist(),
                       SamplingParams(max_new_tokens=128, temperature=0.0, ignore_eos=True))
            for _ in range(n_req)]
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    steps, traced, traced_wall = [], 0, 0.0
    with torch.inference_mode():
        while eng.busy:
            dec, waiting = eng.pool.num_decoding, len(eng.scheduler.waiting)
            trace = traced < trace_steps and waiting > 0
            if trace and traced == 0:
                prof.start()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.run_step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if trace:
                traced += 1
                traced_wall += dt
                if traced == trace_steps or not eng.scheduler.waiting:
                    prof.stop()
                    traced = trace_steps
            steps.append({"ms": round(dt * 1e3, 2), "decode_before": dec,
                          "joined": eng.pool.num_decoding - dec, "waiting_before": waiting})
    assert all(r.finished for r in reqs)
    ka = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                 for e in ka)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    with_prompts = [s for s in steps if s["joined"] > 0]
    return {"requests": n_req, "steps": len(steps), "total_ms": round(sum(s["ms"] for s in steps), 1),
            "prompt_steps_ms": round(sum(s["ms"] for s in with_prompts), 1),
            "traced_wall_ms": round(traced_wall * 1e3, 1), "traced_gpu_busy_ms": round(gpu_us / 1e3, 1),
            "first_steps": steps[:8], "prompt_steps": with_prompts}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--tokenizer", default=".data/shared/tokenizers/falcon")
    ap.add_argument("--cache-bytes", type=int, default=1 << 30)
    ap.add_argument("--cache-device", default=None, help="default: the model's device")
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--wave", default="", help="comma-separated request counts (wave part); alone "
                    "with --skip-burst")
    ap.add_argument("--trace-steps", type=int, default=5)
    ap.add_argument("--skip-burst", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = get_preset("falcon-mamba-7b").replace(num_hidden_layers=args.layers)
    with torch.device("cuda"):
        model = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    tok = load_tokenizer(args.tokenizer)
    eng = Engine(model, tok, EngineConfig(num_slots=args.slots, max_waiting=4096, prefill_chunk=576,
                                          prefill_budget=2048, cache_bytes=args.cache_bytes,
                                          cache_device=args.cache_device))
    t0 = time.perf_counter()
    eng.warm_up()
    res = {"warm_up_s": time.perf_counter() - t0, "layers": args.layers, "gpu": torch.cuda.get_device_name()}
    gen = torch.Generator().manual_seed(0)
    burst(eng, 8, gen, cProfile.Profile())  # compile the prefill shapes
    parts = [] if args.skip_burst else [("burst", lambda p: burst(eng, args.burst, gen, p))]
    for w in filter(None, args.wave.split(",")):
        parts.append((f"wave{w}", lambda p, w=int(w): wave(eng, w, gen, args.trace_steps)))
    if not args.skip_mixed:
        parts.append(("mixed", lambda p: mixed(eng, gen, p)))
    res["cache_device"] = str(eng.cache.device)
    for name, fn in parts:
        prof = cProfile.Profile()
        res[name] = fn(prof)
        print(f"== {name}: {res[name]}", flush=True)
        if not name.startswith("wave"):  # the wave's profile is torch.profiler's, printed by it
            print(top(prof), flush=True)
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
