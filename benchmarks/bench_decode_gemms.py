"""The batched decode step's projections through other cuBLAS entry points than F.linear.

    PYTHONPATH=. python3 benchmarks/bench_decode_gemms.py [--rows 64,256] [--out F.json]

At 64 and 256 rows cuBLAS picks a split-K kernel for out_proj and x_proj (results/
h200-profile-decode-b64-b256-d03fb39.txt: out_proj 25.3 us + its reduce at 64 rows against a
16.2 us weight-read floor). cuBLAS chooses its kernel by the problem's shape, so the same product
asked another way may get another kernel. Per projection and row count, each variant runs over 16
distinct weights (16 layers' worth, so the weights come from DRAM as in the step) inside a CUDA
graph: F.linear (the step today); the swapped product W @ x^T (cuBLAS sees m and n exchanged; its
output transposed, and made contiguous again as the next kernel needs); F.linear through cuBLASLt
(torch.backends.cuda.preferred_blas_library), and F.linear with a zero bias (PyTorch's addmm with a
1-D bias takes cuBLASLt's gemm-and-bias entry point; adding 0 leaves every output as it was).
us per call, median of the graph replays, with the weight-read floor at the copy rate.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

SHAPES = {"in_proj": (4096, 16384), "out_proj": (8192, 4096), "x_proj": (8192, 288), "dt_proj": (256, 8192)}
LAYERS = 16


def graph_us(fn, reps: int = 30) -> float:
    """Median us per fn() call: fn runs LAYERS times per graph replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1) * 1e3 / LAYERS)
    return sorted(out)[len(out) // 2]


def variants(xs, ws):
    def linear():
        for x, w in zip(xs, ws):
            F.linear(x, w)

    zero = torch.zeros(ws[0].shape[0], dtype=ws[0].dtype, device=ws[0].device)

    def zero_bias():  # addmm with a 1-D bias: PyTorch's cuBLASLt path (gemm_and_bias)
        for x, w in zip(xs, ws):
            F.linear(x, w, zero)

    def swapped_view():
        for x, w in zip(xs, ws):
            torch.mm(w, x.t())

    def swapped_contiguous():
        for x, w in zip(xs, ws):
            torch.mm(w, x.t()).t().contiguous()

    return {"linear": linear, "linear+zero bias": zero_bias, "swapped": swapped_view,
            "swapped+contiguous": swapped_contiguous}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64,256")
    ap.add_argument("--copy-tbs", type=float, default=4.14)
    ap.add_argument("--out")
    args = ap.parse_args()
    import triton

    res = {"gpu": torch.cuda.get_device_name(0), "commit": os.environ.get("FALCON_MAMBA_COMMIT"),
           "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (K, N) in SHAPES.items():
        ws = [torch.randn(N, K, device="cuda", generator=g).bfloat16() * 0.02 for _ in range(LAYERS)]
        floor = N * K * 2 / (args.copy_tbs * 1e12) * 1e6
        for M in (int(m) for m in args.rows.split(",")):
            xs = [torch.randn(M, K, device="cuda", generator=g).bfloat16() for _ in range(LAYERS)]
            row = {"proj": name, "M": M, "K": K, "N": N, "floor_us": floor}
            for vname, fn in variants(xs, ws).items():
                row[vname] = graph_us(fn)
            prev = torch.backends.cuda.preferred_blas_library()
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                row["linear cublaslt"] = graph_us(variants(xs, ws)["linear"])
            except Exception as e:  # noqa: BLE001 - report and go on
                row["linear cublaslt"] = f"{type(e).__name__}: {e}"[:120]
            finally:
                torch.backends.cuda.preferred_blas_library(prev)
            res["rows"].append(row)
            print(f"{name:8s} M={M:3d} floor {floor:6.1f} us  " + "  ".join(
                f"{k} {v:6.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                if k not in ("proj", "M", "K", "N", "floor_us")), flush=True)
        del ws
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        raise SystemExit(main())
