"""The decode step's projections at 16-64 rows (7B shapes, bf16): cuBLAS (F.linear, what the batched
decode step runs) against ops/triton_skinny.py over a grid of launch shapes, each timed inside a CUDA
graph (the decode step's launch conditions). Prints one line per (projection, rows): cuBLAS, the
best Triton config, both as a fraction of the weight-read floor at the copy rate; then JSON.

    PYTHONPATH=. python3 benchmarks/bench_skinny.py [--rows 16,64] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.testing

from falcon_mamba.ops.triton_skinny import SkinnyConfig, skinny_linear

COPY_TBS = 4.14  # H200 device-to-device copy (ENGINEERING.md section 6)
SHAPES = {"in_proj": (4096, 16384), "out_proj": (8192, 4096), "x_proj": (8192, 288),
          "dt_proj": (256, 8192), "lm_head": (4096, 65024)}  # name: (K, N)


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="16,64")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    configs = [SkinnyConfig(bn, bk, s, 4, 4)
               for bn, bk, s in itertools.product((32, 64, 128), (128, 256), (1, 2, 4))]
    rec = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": os.environ.get("FALCON_MAMBA_COMMIT"), "rows": []}
    for name in a.shapes.split(","):
        K, N = SHAPES[name]
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        floor_us = N * K * 2 / (COPY_TBS * 1e12) * 1e6
        for M in (int(v) for v in a.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, w)
            cub = graph_us(lambda x=x, w=w: F.linear(x, w))
            out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            tri = {}
            for cfg in configs:
                try:
                    got = skinny_linear(x, w, cfg, out=out)
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    us = graph_us(lambda x=x, w=w, cfg=cfg, out=out: skinny_linear(x, w, cfg, out=out))
                    tri[cfg.name] = {"us": us, "err": err}
                except Exception as e:  # noqa: BLE001 - a config that fails is reported, the rest run
                    tri[cfg.name] = {"error": str(e)[:160]}
            ok = {k: v for k, v in tri.items() if "us" in v and v["err"] < 2e-2}
            best = min(ok, key=lambda k: ok[k]["us"]) if ok else None
            row = {"proj": name, "M": M, "K": K, "N": N, "floor_us": floor_us, "cublas_us": cub,
                   "best": best, "best_us": ok[best]["us"] if best else None, "configs": tri}
            rec["rows"].append(row)
            bu = row["best_us"] or float("inf")
            print(f"{name:9s} M={M:3d} floor {floor_us:7.1f} us  cuBLAS {cub:7.1f} us "
                  f"({floor_us / cub:4.0%})  triton {bu:7.1f} us ({floor_us / bu:4.0%}) {best}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
