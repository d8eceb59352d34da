"""Where a prompt chunk's time goes (GPU): the 7B forward on one row, fresh and continuing a state,
at the chunk lengths the engine uses, then one continuing chunk under torch.profiler.

    PYTHONPATH=. python3 benchmarks/profile_prefill.py [--layers 64] [--out F.json]

Per length L: GPU ms (CUDA events around the call), host ms (until the call returns, before any
synchronisation: what the engine thread spends launching), tok/s, and the matmul floor (the
projections' FLOPs at the measured bf16 matmul rate). A host time near the GPU time means the
chunk is launch-bound; a GPU time far above the floor, that some kernel is. The profiler table
lists the kernels of one continuing 512-token chunk by GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.config import get_preset  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


def time_chunk(model, ids, state, reps: int) -> tuple[float, float]:
    """(GPU ms, host ms) per call, medians."""
    gpu, host = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        t = time.perf_counter()
        model(ids, state=state, last_only=True)
        host.append((time.perf_counter() - t) * 1e3)
        e1.record()
        torch.cuda.synchronize()
        gpu.append(e0.elapsed_time(e1))
    return sorted(gpu)[len(gpu) // 2], sorted(host)[len(host) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--lengths", default="128,256,512,1024,2048,8192")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = get_preset("falcon-mamba-7b").replace(num_hidden_layers=args.layers)
    with torch.device("cuda"):
        model = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    tf = matmul_tflops()
    H, D, R, N, V = (cfg.hidden_size, cfg.intermediate_size, cfg.time_step_rank, cfg.state_size,
                     cfg.vocab_size)
    flops_tok = 2 * args.layers * (H * 2 * D + D * (R + 2 * N) + R * D + D * H)
    res = {"gpu": torch.cuda.get_device_name(), "layers": args.layers, "matmul_tflops": tf,
           "torch": torch.__version__, "commit": os.environ.get("FALCON_MAMBA_COMMIT"), "rows": []}
    print(f"bf16 matmul {tf:.0f} TFLOP/s; projections {flops_tok / 1e9:.1f} GFLOP per token", flush=True)
    V_ids = torch.randint(100, V, (1, max(int(x) for x in args.lengths.split(","))), device="cuda")
    with torch.inference_mode():
        _, st = model(V_ids[:, :64], last_only=True)
        for L in (int(x) for x in args.lengths.split(",")):
            ids = V_ids[:, :L]
            for kind, state in (("fresh", None), ("continuing", st)):
                model(ids, state=state, last_only=True)  # compile this length's variants
                g, h = time_chunk(model, ids, state, args.reps)
                floor = flops_tok * L / (tf * 1e12) * 1e3
                row = {"L": L, "kind": kind, "gpu_ms": g, "host_ms": h, "tok_s": L / g * 1e3,
                       "matmul_floor_ms": floor, "fraction_of_floor": floor / g}
                res["rows"].append(row)
                print(f"L {L:6d} {kind:10s} gpu {g:8.2f} ms  host {h:7.2f} ms  {L / g * 1e3:9.0f} tok/s"
                      f"  matmul floor {floor:7.2f} ms ({floor / g:.0%})", flush=True)
        ids = V_ids[:, :512]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, state=st, last_only=True)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22)
        print(table, flush=True)
        res["profile_512_continuing"] = table
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
