"""The packed-bf16 int4 GEMV (ops/triton_gemv_i4.py) at the 7B shapes: error, tiles, then the decode.

    PYTHONPATH=. python3 benchmarks/sweep_i4x2.py --out DIR [--budget-s 150] [--layers 64]

1. Error of one GEMV against the fp64 product with the dequantized weight (random bf16 weights,
   std K^-0.5, int4 g128; random bf16 x): the packed kernel per chain length, the fp32 int4 kernel
   (triton_gemv FMT 4, its tuned tile), and the bf16 rounding of the exact result for scale.
2. Tiles of the packed kernel for in_proj (16384 x 4096), out_proj (4096 x 8192) and a plain lm_head
   (65024 x 4096), reading x's pair-layout copy as the decode step gives it ("i4x2+pairs"; the
   first three also building the pairs themselves, "i4x2"), beside the tuned fp32 int4 tile and
   the bf16 tuned tile, each timed by sweep_decode.bench (CUDA graph, weight copies beyond twice
   the L2: every call reads HBM).
3. The fastest packed tile per shape put into triton_gemv.TUNED (in this process), then
   bench_quant.py's measurement (bf16, int8, int4 g128; --layers) with that table.
Writes DIR/sweep_i4x2.json and DIR/quant.json; prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import sweep_decode as sd  # noqa: E402

from falcon_mamba.ops import triton_gemv as G  # noqa: E402

sd.SHAPES["lm_head_plain"] = (65024, 4096, "plain")
SHAPES = ("in_proj", "out_proj", "lm_head_plain")
# (bn, bk, warps, stages, chained words)
TILES = {
    "in_proj": [(8, 1024, 4, 4, 4), (16, 1024, 4, 4, 4), (4, 1024, 4, 4, 4), (8, 2048, 4, 4, 4),
                (8, 512, 4, 4, 4), (16, 512, 4, 4, 4), (8, 1024, 8, 4, 4), (8, 1024, 4, 3, 4),
                (8, 1024, 4, 4, 1), (32, 512, 4, 4, 4), (4, 2048, 4, 4, 4), (16, 2048, 8, 4, 4)],
    "out_proj": [(4, 2048, 4, 4, 4), (2, 2048, 4, 4, 4), (4, 1024, 4, 4, 4), (2, 4096, 4, 4, 4),
                 (4, 4096, 8, 4, 4), (4, 2048, 8, 4, 4), (8, 2048, 4, 4, 4), (8, 1024, 4, 4, 4),
                 (4, 2048, 4, 4, 1), (2, 1024, 4, 4, 4)],
    "lm_head_plain": [(8, 1024, 4, 4, 4), (16, 1024, 4, 4, 4), (4, 1024, 4, 4, 4), (8, 2048, 4, 4, 4),
                      (8, 512, 4, 4, 4)],
}

def pair_copy(x: torch.Tensor) -> torch.Tensor:
    """x in the pair layout (triton_decode._pair_index): slot 2 * (j * K/8 + w) + h = x[8w + j + 4h]."""
    K = x.numel()
    j, w, h = torch.meshgrid(torch.arange(4), torch.arange(K // 8), torch.arange(2), indexing="ij")
    return x[(8 * w + j + 4 * h).reshape(-1).to(x.device)].contiguous()


def errors(gen) -> dict:
    from falcon_mamba.ops.triton_gemv import GemvConfig, default_config, fused_gemv
    from falcon_mamba.quant import formats

    out = {}
    for name in SHAPES:
        N, K, _ = sd.SHAPES[name]
        gw = sd.make_weight("int4g128", N, K, gen)
        deq = formats.dequantize(gw.w, gw.scales, gw.zeros, 4, 128, K, torch.float64)
        x = torch.randn(K, device="cuda", generator=gen).to(torch.bfloat16)
        ref = deq @ x.double()

        def rel(y, ref=ref):
            return ((y.double() - ref).norm() / ref.norm()).item()

        rec = {"bf16_rounding_of_exact": rel(ref.to(torch.bfloat16)),
               "fp32_kernel": rel(fused_gemv(gw, x, out_dtype=torch.float32,
                                             config=GemvConfig(bn=16, bk=1024, xsplit=True)))}
        base = default_config(gw, x.device)
        for ch in (1, 4):
            cfg = GemvConfig(bn=16, bk=1024, i4x2=ch)
            rec[f"i4x2_ch{ch}"] = rel(fused_gemv(gw, x, out_dtype=torch.float32, config=cfg))
        rec["tuned"] = rel(fused_gemv(gw, x, out_dtype=torch.float32))
        rec["tuned_tile"] = base.__dict__
        out[name] = rec
        print(name, {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    return out


def sweep(gen, budget_s: float) -> dict:
    from falcon_mamba.ops.triton_gemv import GemvConfig, default_config, fused_gemv

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    res = {}
    queues = {}
    for name in SHAPES:
        case = sd.Case(name, "int4g128", gen, l2)
        bcase = sd.Case(name, "bf16", gen, l2)
        q = [("fp32-int4 tuned", case, default_config(case.ws[0], torch.device("cuda"))),
             ("bf16 tuned", bcase, default_config(bcase.ws[0], torch.device("cuda")))]
        case.pairs = pair_copy(case.x)
        tiles = [GemvConfig(bn=bn, bk=bk, warps=w, stages=st, i4x2=ch) for bn, bk, w, st, ch in TILES[name]]
        q += [("i4x2+pairs", case, c) for c in tiles] + [("i4x2", case, c) for c in tiles[:3]]
        queues[name] = q
        res[name] = {"int4_bytes": case.bytes, "bf16_bytes": bcase.bytes, "runs": []}
    t0 = time.time()
    for i in range(max(len(q) for q in queues.values())):
        for name, q in queues.items():
            if i >= len(q):
                continue
            label, case, cfg = q[i]
            rec = {"label": label, "config": cfg.__dict__}
            if time.time() - t0 > budget_s:
                rec["status"] = "skipped: time budget"
            else:
                try:
                    if label == "i4x2+pairs":
                        fn = (lambda case=case, cfg=cfg:  # noqa: E731
                              fused_gemv(case.next_w(), case.x, config=cfg, x_pairs=case.pairs))
                    else:
                        fn = case.fn(cfg)
                    t = sd.bench(fn)
                    rec.update(status="ok", us=t * 1e6, GBps=case.bytes / t / 1e9)
                except Exception as e:  # recorded, not fatal
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    rec["status"] = f"failed: {type(e).__name__}: {first}"
            res[name]["runs"].append(rec)
            if rec.get("us"):
                print(f"{name:14s} {label:16s} {rec['us']:8.1f} us {rec['GBps']:7.0f} GB/s {cfg.__dict__}",
                      flush=True)
            else:
                print(f"{name:14s} {label:16s} {rec['status']}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--skip-quant", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rec = {"env": sd.env(), "errors": errors(gen)}
    rec["tiles"] = sweep(gen, args.budget_s)
    best = {}
    for name, r in rec["tiles"].items():
        ok = [x for x in r["runs"] if x.get("us") and x["label"] == "i4x2+pairs"]
        if ok:
            b = min(ok, key=lambda x: x["us"])
            best[name] = b
            N, K, _ = sd.SHAPES[name]
            G.TUNED[("int4g128", N, K, False)] = G.GemvConfig(**b["config"])
    rec["chosen"] = best
    print("chosen:", {k: (round(v["us"], 1), v["config"]) for k, v in best.items()}, flush=True)
    with open(os.path.join(args.out, "sweep_i4x2.json"), "w") as f:
        json.dump(rec, f, indent=1)
    if not args.skip_quant:
        import bench_quant

        sys.argv = ["bench_quant.py", "--layers", str(args.layers),
                    "--json", os.path.join(args.out, "quant.json")]
        bench_quant.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
