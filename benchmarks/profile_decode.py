"""Where the decode step spends its time, per kernel (GPU), at batch 1 (or --batches 1,64,256).

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--layers 16] [--formats bf16,int8,int4]
        [--batches 1] [--out F.json]

For each weight format: a random Falcon Mamba 7B-shaped model with --layers layers (int8 / int4 g128
through quantize_model), the kernel loop (decode/loop.py: its autotuned mode and the timings of every
candidate mode), then 20 graphed greedy steps under torch.profiler: every kernel's time per step
(summed over layers and divided by them: us per layer), launches per step, and the step's total.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.config import PRESETS  # noqa: E402
from falcon_mamba.decode.loop import KernelLoop  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.quant import quantize_model  # noqa: E402

STEPS = 20


def kernel_totals(prof) -> dict[str, list]:
    """A torch.profiler run's GPU kernels: name -> [total us, launches]."""
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += getattr(ev, "device_time_total", None) or ev.cuda_time_total
            per[ev.name][1] += 1
    return per


@torch.no_grad()
def timed_and_profiled(loop: KernelLoop, steps: int):
    """(ms per step over 100 steps after 3 warm-up steps, a torch.profiler run of `steps` more)."""
    loop.run(3)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loop.run(100)
    end.record()
    end.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loop.run(steps)
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 100, prof


@torch.no_grad()
def profile(model, layers: int, batch: int = 1, ssm_dtype=torch.float32) -> dict:
    loop = KernelLoop(model, batch, ssm_dtype=ssm_dtype)
    step_ms, prof = timed_and_profiled(loop, STEPS)
    per = kernel_totals(prof)
    rows = sorted(((n, t / STEPS, c / STEPS) for n, (t, c) in per.items()), key=lambda r: -r[1])
    m = loop.mode
    return {"mode": m["mode"], "pdl": m.get("pdl"), "timings_ms": m.get("candidates_ms"), "step_ms": step_ms,
            "kernels": [{"name": n[:90], "us_per_step": t, "launches_per_step": c, "us_per_layer": t / layers}
                        for n, t, c in rows],
            "critical_path": critical_path(prof, layers)}


def critical_path(prof, layers: int) -> list[dict]:
    """What each kernel adds to the step under PDL: kernels in start order, each one's end minus
    the previous kernel's end (the step's time is the sum of these increments), with its own
    duration and its start relative to the previous end (negative: launched early), averaged per
    kernel name and given per layer."""
    evs = sorted(((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                  if ev.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[0])
    acc = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for (_, e0, _), (s1, e1, name) in zip(evs, evs[1:]):
        if e1 - e0 > 200:  # the host gap between two graph replays, not a kernel boundary
            continue
        a = acc[name]
        a[0] += e1 - e0
        a[1] += e1 - s1
        a[2] += s1 - e0
        a[3] += 1
    rows = [{"name": n[:90], "added_us_per_layer": a[0] / STEPS / layers, "launches_per_step": a[3] / STEPS,
             "mean_added_us": a[0] / a[3], "mean_duration_us": a[1] / a[3],
             "mean_start_vs_prev_end_us": a[2] / a[3]}
            for n, a in acc.items()]
    return sorted(rows, key=lambda r: -r["added_us_per_layer"])


def random_7b(layers: int):
    """A random bf16 Falcon Mamba 7B-shaped model with this many layers on the GPU (seed 0)."""
    torch.manual_seed(0)
    cfg = PRESETS["falcon-mamba-7b"].replace(num_hidden_layers=layers)
    with torch.device("cuda"):
        return FalconMamba(cfg).to_dtype(torch.bfloat16).eval()


def in_format(base, fmt: str):
    """base itself for bf16, else a quantized copy (int8 per channel, int4 g128)."""
    if fmt == "bf16":
        return base
    return quantize_model(copy.deepcopy(base), 8 if fmt == "int8" else 4, None if fmt == "int8" else 128)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--batches", default="1", help="batch sizes (results keyed 'FORMAT' at 1, else "
                                                   "'FORMAT@B')")
    ap.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the pool's SSM states (serve --state-dtype)")
    ap.add_argument("--out")
    args = ap.parse_args()
    ssm_dtype = getattr(torch, args.state_dtype)
    base = random_7b(args.layers)
    res = {"layers": args.layers, "gpu": torch.cuda.get_device_name(0),
           "commit": os.environ.get("FALCON_MAMBA_COMMIT"), "state_dtype": args.state_dtype, "formats": {}}
    for fmt in args.formats.split(","):
        model = in_format(base, fmt)
        for batch in (int(b) for b in args.batches.split(",")):
            key = fmt if batch == 1 else f"{fmt}@{batch}"
            r = profile(model, args.layers, batch, ssm_dtype)
            res["formats"][key] = r
            print(f"\n== {key}: mode {r['mode']} pdl {r['pdl']}, step {r['step_ms']:.3f} ms "
                  f"({r['step_ms'] * 1e3 / args.layers:.1f} us per layer); candidates "
                  + ", ".join(f"{k} {v:.3f}" for k, v in (r["timings_ms"] or {}).items()), flush=True)
            tot = sum(k["us_per_step"] for k in r["kernels"])
            print(f"   kernels sum {tot:.0f} us per step")
            for k in r["kernels"][:14]:
                print(f"   {k['us_per_layer']:7.2f} us/layer {k['launches_per_step']:6.1f} launches  "
                      f"{k['name']}")
            print("   critical path (end minus the previous kernel's end):")
            for k in r["critical_path"][:14]:
                print(f"   {k['added_us_per_layer']:7.2f} us/layer added; per launch: added "
                      f"{k['mean_added_us']:6.2f} duration {k['mean_duration_us']:6.2f} start-vs-prev-end "
                      f"{k['mean_start_vs_prev_end_us']:6.2f}  {k['name']}")
        if model is not base:
            del model
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
