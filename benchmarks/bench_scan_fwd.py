"""The selective-scan forward where prefill, the server's prompt bursts and training run it: the 7B
width (D 8192) at 1 x 16384 and 1 x 2048 (bench prefill's prompts), 64 x 32 (a burst of short
prompts, one reset a row) and, at the ~1.5B width (D 4096), 8 x 2048 with saved states and
resets (training). Inputs as the model makes them: x and z strided halves of in_proj's output,
B and C slices of x_proj's output, bf16. Each launch (block_d, unroll, warps) against, with
--base, the forward of an earlier triton_scan.py on the same inputs in the same run.

    git show HEAD~1:falcon_mamba/ops/triton_scan.py > base_scan.py
    PYTHONPATH=. python3 benchmarks/bench_scan_fwd.py [--base base_scan.py] [--variants 32:2:1,64:2:1]

Per row: ms (median of do_bench), the relative error of y against the float64 reference on 64
channels (rows without resets inside), and the speed-up over the base where given. The kernel is
bound by instruction issue, not bytes (benchmarks/inspect_kernels.py --dump counts a step's SASS).
Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import torch
import triton
import triton.testing

from falcon_mamba.ops import reference, triton_scan

SHAPES = {  # name: (B, L, D, training: saved states and resets)
    "1x16384": (1, 16384, 8192, False),
    "1x2048": (1, 2048, 8192, False),
    "64x32": (64, 32, 8192, False),
    "16x32": (16, 32, 8192, False),
    "train 8x2048": (8, 2048, 4096, True),
    # the training step's own layout and data (MixerFn): x the conv's contiguous output, B and C
    # the norms' contiguous outputs, a reset tensor without resets, dt and A as initialised
    "train-step 8x2048": (8, 2048, 4096, True),
}


def bench(fn, graph: bool = False) -> float:
    """ms, median: do_bench, or inside a CUDA graph (the short prompt bursts' shapes: a launch's
    host time is ~as long as the kernel there, and the server replays these as graphs)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
    return triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median")  # ms


def step_inputs(B: int, L: int, D: int, N: int = 16):
    """As MixerFn.forward hands them to scan_fwd at a freshly initialised layer (model.init_weights)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    xz = torch.randn(B, L, 2 * D, device=dev, generator=g).bfloat16()
    x = torch.nn.functional.silu(torch.randn(B, L, D, device=dev, generator=g)).bfloat16()
    dt = (torch.randn(B, L, D, device=dev, generator=g) * 0.1).bfloat16()
    u = torch.rand(D, device=dev, generator=g)
    lo, hi = math.log(0.001), math.log(0.1)
    dtv = torch.exp(u * (hi - lo) + lo)
    dtb = dtv + torch.log(-torch.expm1(-dtv))
    A = -torch.arange(1, N + 1, dtype=torch.float32, device=dev).expand(D, N).contiguous()
    Bm = torch.randn(B, L, N, device=dev, generator=g).bfloat16()
    Cm = torch.randn(B, L, N, device=dev, generator=g).bfloat16()
    return dict(x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, Dv=torch.ones(D, device=dev), z=xz[..., D:], dt_bias=dtb,
                reset=torch.zeros(B, L, dtype=torch.bool, device=dev), save_chk=True)


def inputs(B: int, L: int, D: int, training: bool, N: int = 16, R: int = 256):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, scale=1.0, shift=0.0: torch.randn(*s, device=dev, generator=g) * scale + shift  # noqa: E731
    xz = r(B, L, 2 * D).bfloat16()
    xdbl = r(B, L, R + 2 * N).bfloat16()
    dt = r(B, L, D, scale=0.5, shift=-1.0).bfloat16()
    A = -torch.exp(r(D, N, scale=0.5))
    Dv, dtb = r(D), r(D, scale=0.5)
    if training:
        rst = torch.rand(B, L, device=dev, generator=g) < 1 / 512
    else:  # a prompt burst: each row its own document; one long prompt: no reset
        rst = torch.zeros(B, L, dtype=torch.bool, device=dev)
        rst[:, 0] = B > 1
    return dict(x=xz[..., :D], dt=dt, A=A, Bm=xdbl[..., R:R + N], Cm=xdbl[..., R + N:], Dv=Dv,
                z=xz[..., D:], dt_bias=dtb, reset=rst if B > 1 or training else None, save_chk=training)


def rel_err(y: torch.Tensor, a: dict, channels: int = 64) -> float:
    sel = slice(0, channels)
    f64 = lambda t: t[..., sel].double()  # noqa: E731
    rst = a["reset"]
    if rst is not None and bool(rst[:, 1:].any()):  # resets inside rows: the reference has none
        return float("nan")
    yr, _ = reference.selective_scan(f64(a["x"]), f64(a["dt"]), a["A"][sel].double(), a["Bm"].double(),
                                     a["Cm"].double(), a["Dv"][sel].double(), f64(a["z"]),
                                     a["dt_bias"][sel].double())
    return ((y[..., sel].double() - yr).norm() / yr.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="an earlier triton_scan.py whose scan_fwd to time too")
    p.add_argument("--variants", default="32:2:1,64:2:1,64:1:1,32:4:1",
                   help="block_d:unroll:warps[:chunk] launches of this tree's forward (chunk: the "
                        "length chunk, a multiple of CHK with saved states; the length itself: one pass)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args()
    base = None
    if a.base:
        spec = importlib.util.spec_from_file_location("base_scan", a.base)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    rows = []
    for shape in a.shapes.split(","):
        B, L, D, training = SHAPES[shape]
        args = step_inputs(B, L, D) if shape.startswith("train-step") else inputs(B, L, D, training)
        ref_ms = None
        if base is not None:
            fn = lambda args=args: base.scan_fwd(**args)  # noqa: E731
            y = fn()[0]
            ref_ms = bench(fn, graph=B * L <= 4096)
            rows.append({"shape": shape, "kernel": "base", "ms": ref_ms, "rel_err": rel_err(y, args)})
            print(rows[-1], flush=True)
        for v in a.variants.split(","):
            bd, unroll, warps, chunk = ([int(t) for t in v.split(":")] + [0])[:4]
            name = f"bd={bd} T={unroll} w={warps}" + (f" chunk={chunk}" if chunk else "")
            fn = lambda args=args, bd=bd, unroll=unroll, warps=warps, chunk=chunk: triton_scan.scan_fwd(  # noqa: E731
                **args, block_d=bd, unroll=unroll, num_warps=warps, chunk=chunk or None)
            try:
                y = fn()[0]
                ms = bench(fn, graph=B * L <= 4096)
            except Exception as e:  # noqa: BLE001 - a launch that fails to compile is reported
                rows.append({"shape": shape, "kernel": name, "error": str(e)[:200]})
                print(rows[-1], flush=True)
                continue
            row = {"shape": shape, "kernel": name, "ms": ms,
                   "rel_err": rel_err(y, args), "bc_words": triton_scan.bc_words(args["Bm"], args["Cm"])}
            if ref_ms:
                row["speedup_vs_base"] = ref_ms / ms
            rows.append(row)
            print(row, flush=True)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__, "rows": rows}))


if __name__ == "__main__":
    with torch.no_grad():
        main()
