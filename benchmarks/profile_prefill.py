"""Where a prompt chunk's time goes (GPU): the 7B forward on one row, fresh and continuing a state,
at the chunk lengths the engine uses, then one continuing chunk under torch.profiler.

    PYTHONPATH=. python3 benchmarks/profile_prefill.py [--layers 64] [--host-profile L] [--out F.json]
    PYTHONPATH=. python3 benchmarks/profile_prefill.py --batches 4x32,16x32,48x32,64x32 [--out F.json]

Per length L: GPU ms (CUDA events around the call), host ms (until the call returns, before any
synchronisation: what the engine thread spends launching), tok/s, and the matmul floor (the
projections' FLOPs at the measured bf16 matmul rate). A host time near the GPU time means the
chunk is launch-bound; a GPU time far above the floor, that some kernel is. The profiler table
lists the kernels of one continuing 512-token chunk by GPU time.

--batches BxL,...: instead, the server's batched fresh-prompt graphs (engine/prefill_graphs.py's
_BatchGraph: B rows of L tokens, as a burst of clients' prompts) replayed, against the eager
forward of the same batch: GPU ms per replay, per token, and the matmul floor. (In the 64-client
serve run at 3631fbe, steps reading 15 prompts, one 16 x 32 replay, took 55-110 ms of GPU while
steps reading 48, a 48 x 32 replay, took ~60: this tells which shape is slow.)
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


def _gpu_ms(fn, reps: int) -> float:
    """Median GPU ms of fn() (CUDA events), after one untimed call."""
    fn()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        out.append(e0.elapsed_time(e1))
    return sorted(out)[len(out) // 2]


def kernel_table(fn, layers: int, reps: int = 3) -> list[dict]:
    """fn() run reps times under torch.profiler (CUDA activity): each kernel name's GPU time per
    call and per layer, and its launches per call, largest first (kernels inside a CUDA graph
    replay are traced as well)."""
    from profile_decode import kernel_totals

    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = kernel_totals(prof)
    rows = sorted(({"name": n[:90], "ms_per_call": t / reps / 1e3, "us_per_layer": t / reps / layers,
                    "launches_per_call": c / reps} for n, (t, c) in per.items()),
                  key=lambda r: -r["ms_per_call"])
    total = sum(r["ms_per_call"] for r in rows)
    print(f"   kernels sum {total:.2f} ms per call", flush=True)
    for r in rows[:18]:
        print(f"   {r['ms_per_call']:8.3f} ms {r['us_per_layer']:8.2f} us/layer "
              f"{r['launches_per_call']:7.1f} launches  {r['name']}", flush=True)
    return rows


def time_batches(model, spec: str, V: int, flops_tok: int, tf: float, reps: int,
                 layers: int, profile_last: bool = False) -> list[dict]:
    """The batched fresh-prompt graphs B x L (all rows real, a reset at each row's start), replayed
    and eager, on the same ids."""
    from falcon_mamba.engine.prefill_graphs import _BatchGraph

    # the graphs stay alive, as the server's do: capturing into a shared pool whose graphs were
    # all freed trips an allocator assert (use_count > 0, torch 2.11)
    pool, sinks, rows, graphs = torch.cuda.graph_pool_handle(), [], [], []
    with torch.inference_mode():
        for item in spec.split(","):
            B, L = (int(v) for v in item.lower().split("x"))
            g = _BatchGraph(model, B, L, pool, sinks)
            graphs.append(g)
            g.ids.copy_(torch.randint(100, V, (B, L), device="cuda"))
            replay = _gpu_ms(g.graph.replay, reps)
            eager = _gpu_ms(lambda g=g: model(g.ids, last_only=True, reset_BL=g.reset), reps)
            floor = flops_tok * B * L / (tf * 1e12) * 1e3
            row = {"B": B, "L": L, "replay_gpu_ms": replay, "eager_gpu_ms": eager,
                   "us_per_token": replay / (B * L) * 1e3, "matmul_floor_ms": floor,
                   "fraction_of_floor": floor / replay}
            rows.append(row)
            print(f"{B:3d} x {L:5d}  replay {replay:8.2f} ms  eager {eager:8.2f} ms  "
                  f"{row['us_per_token']:6.1f} us/token  matmul floor {floor:6.2f} ms ({floor / replay:.0%})",
                  flush=True)
    if profile_last and graphs:
        g = graphs[-1]
        print(f"kernels of one {g.ids.shape[0]} x {g.ids.shape[1]} replay:", flush=True)
        rows[-1]["kernels"] = kernel_table(g.graph.replay, layers)
    return rows


def host_profile(model, ids) -> str:
    """cProfile of one fresh forward (after a warm-up call): the 30 functions of most own time and
    of most cumulative time, as text (printed too)."""
    import cProfile
    import io
    import pstats

    model(ids, last_only=True)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    model(ids, last_only=True)
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    st = pstats.Stats(pr, stream=out)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(30)
    text = f"host profile of one fresh {ids.shape[1]}-token forward\n" + out.getvalue()
    print(text, flush=True)
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--lengths", default="128,256,512,1024,2048,8192")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--batches", default=None, help="B x L of batched fresh graphs to time, e.g. 16x32,48x32")
    ap.add_argument("--profile", action="store_true",
                    help="with --batches: the kernels of the last shape's replay; else of one fresh "
                         "row of --profile-length tokens too")
    ap.add_argument("--profile-length", type=int, default=16384)
    ap.add_argument("--host-profile", type=int, default=None, metavar="L",
                    help="also one fresh L-token forward under cProfile: where its host time goes "
                         "(an eager chunk whose host time reaches its GPU time is launch-bound)")
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
    if args.batches:
        res["batches"] = time_batches(model, args.batches, V, flops_tok, tf, args.reps, args.layers,
                                      args.profile)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return 0
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
        if args.host_profile:
            hp_ids = torch.randint(100, V, (1, args.host_profile), device="cuda")
            res["host_profile"] = host_profile(model, hp_ids)
        if args.profile:
            L = args.profile_length
            ids = torch.randint(100, V, (1, L), device="cuda")
            print(f"kernels of one fresh {L}-token row:", flush=True)
            res[f"kernels_fresh_{L}"] = kernel_table(lambda: model(ids, last_only=True), args.layers)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
