"""Device-side sampling (ops/triton_sample.py) on the GPU: sample_rows at V = 65,024 for B in (1, 64,
256), greedy / temperature / temperature + top-p / top-k + top-p + min-p + penalty, timed eagerly
and as the replay of a captured CUDA graph (triton.testing.do_bench, median; do_bench flushes L2
before each run, so the first pass reads the logits from HBM), and as one graph of 20 calls back to
back ("in L2": the decode step's case, where lm_head has just written the logits), beside a
one-pass floor (torch's row max over the same logits). Prints a table, then one JSON line.

    PYTHONPATH=. python3 benchmarks/bench_sampler.py [--dtype fp32|bf16] [--logits peaked|flat]
        [--sweep] [--out FILE]        # --sweep: BLOCK x num_warps as well as the defaults
    PYTHONPATH=. python3 benchmarks/bench_sampler.py --cpu   # the torch path on one CPU core

Logits: "peaked" (default) is randn * 2.5 with 20 tokens raised by 8, roughly a language model's
next-token row at temperature 1 (the top token holds ~20-40%); "flat" is randn * 0.5, where
top-p's nucleus is thousands of tokens wide and most first draws are rejected (the slow case).
The estimates to check (module docstring of ops/triton_sample.py), batch 1: greedy ~5 us,
temperature ~30 us, temperature + top-p ~35-40 us (the budget: ~1-2% of a 4 ms decode step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.ops.sample import SamplerRows, sample_rows_torch  # noqa: E402
from falcon_mamba.sampling import SamplingParams  # noqa: E402

V = 65024
BATCHES = (1, 64, 256)
REPEAT = 20
DEVICE = "cuda"
CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "temperature+top_p": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k+top_p+min_p+penalty": SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02,
                                                repetition_penalty=1.1),
}


def make_logits(B, kind, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        x = torch.randn(B, V, generator=g) * 0.5
    else:
        x = torch.randn(B, V, generator=g) * 2.5
        x.scatter_add_(1, torch.randint(0, V, (B, 20), generator=g), torch.full((B, 20), 8.0))
    return x.to(dtype).to(device)


def make_rows(B, params, device):
    g = torch.Generator().manual_seed(1)
    seen = [torch.randint(0, V, (300,), generator=g).tolist() for _ in range(B)]
    return SamplerRows.from_params([params] * B, list(range(B)), device, V,
                                   seen_ids=seen if params.repetition_penalty != 1 else None)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_bench(args):
    import triton
    import triton.testing

    from falcon_mamba.ops import triton_sample

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev = DEVICE
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # noqa: E731
    records = []
    configs = [(None, None)]
    if args.sweep:
        # four logits per thread avoids spills (ptxas, sm_90); 8 per thread is worth a look at B = 1
        configs += [(512, 4), (1024, 8), (2048, 16), (1024, 4), (2048, 8), (4096, 16)]
    for B in BATCHES:
        x = make_logits(B, args.logits, dt, dev)
        floor = bench(lambda x=x: x.max(-1))
        for name, params in CASES.items():
            for block, warps in configs:
                rows = make_rows(B, params, dev)
                tok = torch.empty(B, dtype=torch.int64, device=dev)
                lp = torch.empty(B, device=dev)
                st = torch.empty(B, dtype=torch.int32, device=dev)
                kw = dict(block=block, num_warps=warps)

                def call(x=x, rows=rows, tok=tok, lp=lp, st=st, kw=kw):
                    triton_sample.sample_rows_triton(x, rows, tok, lp, st, **kw)

                if block is None:  # the same tokens as the torch path on the CPU (near-ties aside)
                    before = rows.to("cpu").clone()
                    call()
                    ref = torch.empty(B, dtype=torch.int64), torch.empty(B), torch.empty(B, dtype=torch.int32)
                    sample_rows_torch(x.cpu(), before, *ref)
                    mismatches = int((tok.cpu() != ref[0]).sum())
                call()
                eager = bench(call)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call()
                replay = bench(graph.replay)
                chain = torch.cuda.CUDAGraph()  # REPEAT calls back to back: the logits stay in L2
                with torch.cuda.graph(chain):
                    for _ in range(REPEAT):
                        call()
                warm = bench(chain.replay) / REPEAT
                torch.cuda.synchronize()
                assert bool((st == 0).all()), "a row failed"
                dblock, dwarps = triton_sample.default_config(B, x.device)
                rec = {"case": name, "B": B, "block": block or dblock, "num_warps": warps or dwarps,
                       "eager_us": round(eager, 2),
                       "graph_us": round(replay, 2), "graph_l2_warm_us": round(warm, 2),
                       "row_max_floor_us": round(floor, 2), "share_of_4ms_step": round(warm / 4000, 4)}
                if block is None:
                    rec["token_mismatches_vs_torch_path"] = mismatches
                records.append(rec)
                print(f"{name:<28} B={B:<4} block={rec['block']:<5} warps={rec['num_warps']:<3} "
                      f"eager {eager:7.1f} us  graph {replay:7.1f} us  in L2 {warm:7.1f} us "
                      f"({100 * warm / 4000:.2f}% of 4 ms)"
                      f"  row-max floor {floor:6.1f} us"
                      + (f"  mismatches {mismatches}/{B}" if block is None else ""), flush=True)
    return {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "logits": args.logits,
            "triton": triton.__version__, "results": records}


def cpu_bench(args):
    """The torch path, one thread: best of 30 (the medians are printed too)."""
    torch.set_num_threads(1)
    records = []
    for vocab in (8192, V):  # the default small model's vocab, and the 7B's
        for kind in ("peaked", "flat"):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(1, vocab, generator=g) * (2.5 if kind == "peaked" else 0.5))
            if kind == "peaked":
                x[0, torch.randint(0, vocab, (20,), generator=g)] += 8
            for name, params in CASES.items():
                rows = SamplerRows.from_params([params], [0], "cpu", vocab,
                                               seen_ids=[list(range(0, vocab, 97))]
                                               if params.repetition_penalty != 1 else None)
                out = (torch.empty(1, dtype=torch.int64), torch.empty(1), torch.empty(1, dtype=torch.int32))
                times = []
                for _ in range(30):
                    t0 = time.perf_counter()
                    sample_rows_torch(x, rows, *out)
                    times.append(time.perf_counter() - t0)
                rec = {"case": name, "V": vocab, "logits": kind, "best_us": round(min(times) * 1e6, 1),
                       "median_us": round(statistics.median(times) * 1e6, 1)}
                records.append(rec)
                print(f"cpu {name:<28} V={vocab:<6} {kind:<7} best {rec['best_us']:9.1f} us  "
                      f"median {rec['median_us']:9.1f} us", flush=True)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": cpu, "load_avg": os.getloadavg()[0], "results": records}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--logits", default="peaked", choices=["peaked", "flat"])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="time the torch path on one CPU core instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench_sampler needs a CUDA GPU (or --cpu for the torch path)")
    rec = cpu_bench(args) if args.cpu else gpu_bench(args)
    rec.update({"bench": "sampler", "V": V, "commit": commit(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d")})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
