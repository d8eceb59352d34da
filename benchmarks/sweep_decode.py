"""Launch-config sweep of the batch-1 GEMV kernels (ops/triton_gemv.py) at the 7B shapes, and the
graphed decode step per projection mode (GPU; one device call, about 4 minutes with compiles).

    PYTHONPATH=. python3 benchmarks/sweep_decode.py --out sweep.json [--budget-s 110] [--layers 16]

Part 1, kernels. Shapes: in_proj 16384x4096 (plain, and fused: add+RMSNorm prologue + conv
epilogue, as the fused step runs it), out_proj 4096x8192, x_proj 288x8192 (split-K; plain, and
x_proj_cx: the conv step computed as its input), lm_head
65024x4096 (norm_f prologue, fp32 logits), and the chain mode's in_proj_rstd (the norm prologue with a
given 1/rms) and out_proj_nepi (the residual-add + next-norm epilogue); --shapes picks a subset;
formats bf16, int8, int4 g128. Each config is timed
with triton.testing.do_bench_cudagraph over enough weight copies to exceed twice the L2 (each
call reads its weights from HBM, as in the model). Reported: us per call and GB/s of weight
bytes (qweight + scales + zeros), beside cuBLAS / triton_decode.gemv / triton_qmm (the current
paths) measured in the same run. A config that fails to compile or run is recorded, not fatal.
int8 / int4 also time GemvConfig.xsplit (the tile's input read once, contiguous, then split by code
position) on the default/tuned tile and the first three grid tiles, ahead of the rest of the grid.
Configs are visited round-robin over (shape, format), so the time budget cuts the tails evenly.

Part 2, the decode step of a 7B-shaped model with --layers layers (random weights; bf16, int8,
int4 g128 via quantize_model): the kernel loop (decode/loop.py) with each forced mode (cublas, triton,
triton_cx; ms/step over 50 greedy replays) and auto (the mode it picks and its own timings); the
step's logits against model.step's. triton_qmm's own tuner is off unless --qmm-tune (it compiles
~20 configs per shape). Prints tables, writes JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {  # name: (N, K, kind)
    "in_proj_fused": (16384, 4096, "norm_conv"),
    "in_proj": (16384, 4096, "plain"),
    "out_proj": (4096, 8192, "plain"),
    "x_proj": (288, 8192, "plain"),
    "x_proj_cx": (288, 8192, "conv_in"),  # the conv step as its input (decode mode triton_gemv_cx)
    "lm_head": (65024, 4096, "norm_logits"),
    # decode mode "chain": in_proj whose norm prologue reads a given 1/rms (no sum-of-squares pass),
    # out_proj with the residual-add + next-norm-statistics epilogue
    "in_proj_rstd": (16384, 4096, "rstd"),
    "out_proj_nepi": (4096, 8192, "norm_out"),
}
FORMATS = ("bf16", "int8", "int4g128")
# int8 in_proj / out_proj: (rows, bk, warps, stages) of the contiguous-input tiles around the tuned ones
EXTRA_INT8 = {
    "in_proj": [(16, 512, 8, 3), (32, 512, 8, 3), (16, 1024, 4, 3), (8, 512, 4, 4), (16, 256, 4, 4),
                (32, 256, 4, 4), (64, 256, 8, 3), (16, 512, 4, 6), (16, 512, 2, 4)],
    "out_proj": [(2, 2048, 4, 4), (4, 4096, 4, 4), (2, 4096, 4, 4), (4, 2048, 8, 3), (8, 2048, 8, 3),
                 (4, 1024, 4, 4), (4, 2048, 4, 6), (1, 4096, 4, 4), (4, 2048, 2, 4)],
}
ELEM_BYTES = {"bf16": 2.0, "int8": 1.0, "int4g128": 0.5}
# (rows, weight bytes per row per iteration, warps, stages): bk = bytes / element size
TILES = [(8, 1024, 4, 4), (16, 512, 4, 4), (4, 2048, 4, 4), (16, 1024, 8, 3), (32, 512, 8, 3),
         (8, 1024, 4, 6), (2, 2048, 4, 4), (64, 256, 8, 3)]


def env() -> dict:
    import triton

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            # the device copy's .git may lag the tree it runs: the caller's FALCON_MAMBA_COMMIT wins
            "python": platform.python_version(), "commit": os.environ.get("FALCON_MAMBA_COMMIT") or commit}


def configs_for(name: str, fmt: str):
    from falcon_mamba.ops.triton_gemv import GemvConfig, default_config

    N, K, kind = SHAPES[name]
    out = []
    tiles = TILES if kind != "plain" or name != "in_proj" else TILES[:4]
    if name in ("lm_head", "out_proj_nepi"):
        tiles = TILES[:4]
    for bn, row_bytes, warps, stages in tiles:
        bk = int(row_bytes / ELEM_BYTES[fmt])
        cfg = GemvConfig(bn=bn, bk=bk, warps=warps, stages=stages)
        if name.startswith("x_proj"):  # split K until about two programs per SM
            s = 1
            while math.ceil(N / bn) * s < 264 and s * 2 * bk <= K:
                s *= 2
            cfg = GemvConfig(bn=bn, bk=bk, warps=warps, stages=stages, split=s)
        out.append(cfg)
    if name.startswith("x_proj"):
        out.append(GemvConfig(**{**out[0].__dict__, "reduce": "kernel"}))
    if name == "out_proj":
        out += [GemvConfig(**{**c.__dict__, "split": 2}) for c in out[:2]]
    if fmt != "bf16":  # the contiguous-input variant (xsplit) of the first tiles, timed before the rest
        out = [GemvConfig(**{**c.__dict__, "xsplit": True}) for c in out[:3]] + out
    if fmt == "int8" and name in EXTRA_INT8:  # more xsplit tiles around the tuned one, timed first
        out = [GemvConfig(bn=bn, bk=bk, warps=w, stages=st, xsplit=True)
               for bn, bk, w, st in EXTRA_INT8[name]] + out
    return out, default_config


def make_weight(fmt: str, N: int, K: int, gen):
    from falcon_mamba.ops.triton_gemv import GemvWeight
    from falcon_mamba.quant import formats

    w = (torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
    if fmt == "bf16":
        return GemvWeight.dense(w)
    bits, group = (8, None) if fmt == "int8" else (4, 128)
    t = formats.quantize_weight(w, bits, group)
    return GemvWeight(w=t["qweight"], bits=bits, scales=t["scales"], zeros=t.get("zeros"), group=group or 0,
                      K=K)


def nbytes(gw) -> int:
    return sum(t.numel() * t.element_size() for t in (gw.w, gw.scales, gw.zeros) if t is not None)


def copies(gw, n: int):
    from dataclasses import replace

    return [gw] + [replace(gw, w=gw.w.clone(), scales=None if gw.scales is None else gw.scales.clone(),
                           zeros=None if gw.zeros is None else gw.zeros.clone()) for _ in range(n - 1)]


class Case:
    """One (shape, format): weight copies and the inputs of the kernel as the decode step calls it."""

    def __init__(self, name, fmt, gen, l2_bytes):
        N, K, kind = SHAPES[name]
        self.name, self.fmt, self.kind = name, fmt, kind
        gw = make_weight(fmt, N, K, gen)
        self.bytes = nbytes(gw)
        self.ws = copies(gw, max(1, math.ceil(2 * l2_bytes / self.bytes)))
        self.i = 0
        bf = torch.bfloat16
        self.x = torch.randn(K, device="cuda", generator=gen).to(bf)
        self.h = torch.randn(K, device="cuda", generator=gen)
        self.res = torch.randn(K, device="cuda", generator=gen).to(bf)
        self.wn = torch.randn(K, device="cuda", generator=gen).to(bf)
        self.h_out = torch.empty(K, device="cuda")
        self.rstd = torch.rand(1, device="cuda", generator=gen) + 0.5
        self.hn = (torch.randn(N, device="cuda", generator=gen), torch.empty(N, device="cuda"))
        D = N // 2
        self.conv = (torch.randn(3, D, device="cuda", generator=gen).to(bf),
                     torch.randn(D, 4, device="cuda", generator=gen).to(bf),
                     torch.randn(D, device="cuda", generator=gen).to(bf))
        self.conv_in = (torch.randn(3, K, device="cuda", generator=gen).to(bf),
                        torch.randn(K, 4, device="cuda", generator=gen).to(bf),
                        torch.randn(K, device="cuda", generator=gen).to(bf))

    def next_w(self):
        self.i = (self.i + 1) % len(self.ws)
        return self.ws[self.i]

    def fn(self, cfg):
        from falcon_mamba.ops.triton_gemv import fused_gemv

        bf = torch.bfloat16
        if self.kind == "plain":
            return lambda: fused_gemv(self.next_w(), self.x, config=cfg)
        if self.kind == "rstd":
            return lambda: fused_gemv(self.next_w(), self.h, norm_weight=self.wn, eps=1e-5, rstd=self.rstd,
                                      round_in=bf, round_y=bf, config=cfg)
        if self.kind == "norm_out":
            return lambda: fused_gemv(self.next_w(), self.x, norm_out=(*self.hn, 1e-5, bf), config=cfg)
        if self.kind == "conv_in":
            return lambda: fused_gemv(self.next_w(), self.x, conv_in=self.conv_in, config=cfg)
        if self.kind == "norm_conv":
            return lambda: fused_gemv(self.next_w(), self.h, residual=self.res, norm_weight=self.wn, eps=1e-5,
                                      h_out=self.h_out, round_in=bf, round_y=bf, conv=self.conv, config=cfg)
        return lambda: fused_gemv(self.next_w(), self.h, residual=self.res, norm_weight=self.wn, eps=1e-5,
                                  out_dtype=torch.float32, round_to=bf, config=cfg)

    def baselines(self):
        """The current paths for the same weights: cuBLAS and triton_decode.gemv (bf16), triton_qmm."""
        from falcon_mamba.ops import triton_decode
        from falcon_mamba.quant.triton_qmm import qmatmul

        x1 = self.x[None]
        if self.fmt == "bf16":
            return {"cublas": lambda: torch.nn.functional.linear(x1, self.next_w().w),
                    "triton_decode.gemv": lambda: triton_decode.gemv(x1, self.next_w().w)}

        def q():
            gw = self.next_w()
            return qmatmul(x1, gw.w, gw.scales, gw.zeros, gw.bits, gw.group or None, gw.K)

        return {"triton_qmm": q}


def bench(fn) -> float:
    """Mean seconds per call inside a CUDA graph."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=15) * 1e-3


def sweep_kernels(budget_s: float, gen, shapes=None, formats=None) -> dict:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    cases, queues, res = {}, {}, {}
    for name in shapes or SHAPES:
        for fmt in formats or FORMATS:
            key = (name, fmt)
            cases[key] = Case(name, fmt, gen, l2)
            cfgs, default_config = configs_for(name, fmt)
            dflt = default_config(cases[key].ws[0], torch.device("cuda"),
                                  conv_in=SHAPES[name][2] == "conv_in")
            # the tuned/default tile with both input paths (xsplit: one contiguous read per tile)
            both = [("grid", replace(dflt, xsplit=True))] if fmt != "bf16" and not dflt.xsplit else []
            queues[key] = [("default", dflt)] + both + [("grid", c) for c in cfgs
                                                        if c != dflt and c != replace(dflt, xsplit=True)]
            if name in ("in_proj", "out_proj", "x_proj"):
                queues[key] = [(b, None) for b in cases[key].baselines()] + queues[key]
            res[f"{name}/{fmt}"] = {"weight_bytes": cases[key].bytes, "copies": len(cases[key].ws),
                                    "runs": []}
    torch.cuda.synchronize()
    t0 = time.time()
    longest = max(len(q) for q in queues.values())
    for i in range(longest):
        for key, q in queues.items():
            if i >= len(q):
                continue
            label, cfg = q[i]
            rec = {"label": label, "config": None if cfg is None else cfg.__dict__}
            if time.time() - t0 > budget_s:
                rec["status"] = "skipped: time budget"
            else:
                try:
                    fn = cases[key].baselines()[label] if cfg is None else cases[key].fn(cfg)
                    t = bench(fn)
                    rec.update(status="ok", us=t * 1e6, GBps=cases[key].bytes / t / 1e9)
                except Exception as e:  # a config the compiler or the GPU rejects: record and go on
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    rec["status"] = f"failed: {type(e).__name__}: {first}"
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # a faulted context: every later config fails too (recorded)
                        pass
            res[f"{key[0]}/{key[1]}"]["runs"].append(rec)
    for key, r in res.items():
        ok = sorted((x for x in r["runs"] if x["status"] == "ok"), key=lambda x: x["us"])
        print(f"\n{key}: {r['weight_bytes'] / 1e6:.1f} MB of weights, {r['copies']} copies")
        for x in ok[:5]:
            print(f"  {x['us']:8.1f} us  {x['GBps']:7.0f} GB/s  {x['label']:20s} {x['config'] or ''}")
        for x in r["runs"]:
            if x["label"] != "grid" and x["label"] != "default" and x["status"] == "ok" and x not in ok[:5]:
                print(f"  {x['us']:8.1f} us  {x['GBps']:7.0f} GB/s  {x['label']} (baseline)")
        bad = [x for x in r["runs"] if x["status"] != "ok"]
        if bad:
            print(f"  not timed: {len(bad)} ({bad[0]['status']})")
    return res


@torch.no_grad()
def decode_modes(layers: int, modes=("cublas", "triton", "triton_cx", "auto"),
                 formats=("bf16", "int8", "int4g128")) -> dict:
    """Each (format, mode) as its own kernel loop: ms/step over 50 greedy replays."""
    from falcon_mamba.config import PRESETS
    from falcon_mamba.decode.loop import KernelLoop
    from falcon_mamba.decode.modes import DecodeOptions
    from falcon_mamba.model import FalconMamba
    from falcon_mamba.quant import quantize_model

    torch.manual_seed(0)
    cfg = PRESETS["falcon-mamba-7b"].replace(num_hidden_layers=layers)
    with torch.device("cuda"):
        base = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    for fmt, bits, group in (("bf16", None, None), ("int8", 8, None), ("int4g128", 4, 128)):
        if fmt not in formats:
            continue
        model = base if bits is None else quantize_model(copy.deepcopy(base), bits, group)
        rec = {}
        st_ref = model.new_state(1)
        for t in tokens:
            ref = model.step(torch.tensor([t], device="cuda"), st_ref)
        for mode in modes:
            try:
                loop = KernelLoop(model, 1, DecodeOptions(mode=mode, tuning_cache=""))
                for t in tokens:
                    loop.pool.tokens[0] = t
                    logits = loop.graphs.step(1)[:1].float()
                err = ((logits - ref).abs().max() / ref.abs().max()).item()
                loop.run(3)
                torch.cuda.synchronize()
                n = 50
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                loop.run(n)
                e.record()
                e.synchronize()
                ms = s.elapsed_time(e) / n
                m = loop.mode
                rec[mode] = {"ms_per_step": ms, "tok_s": 1e3 / ms, "logits_rel_err_vs_step": err,
                             "chosen": m["mode"] + ("+pdl" if m["pdl"] else ""),
                             "autotune_ms": dict(m["candidates_ms"]), "autotune_errors": dict(m["errors"])}
            except Exception as e:
                rec[mode] = {"error": f"{type(e).__name__}: {e}"[:300],
                             "trace": traceback.format_exc()[-1500:]}
            torch.cuda.synchronize()
        out[fmt] = rec
        print(f"\ndecode step, {layers} layers, {fmt}:")
        for mode, r in rec.items():
            if "error" in r:
                print(f"  {mode:7s} ERROR {r['error']}")
            else:
                print(f"  {mode:7s} {r['ms_per_step']:7.3f} ms/step  {r['tok_s']:7.1f} tok/s  "
                      f"logits rel err {r['logits_rel_err_vs_step']:.2e}  chosen {r['chosen']}"
                      + (f"  autotune {r['autotune_ms']}" if mode == "auto" else ""))
        if model is not base:
            del model
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--budget-s", type=float, default=110.0, help="time for the kernel sweep (then skip)")
    ap.add_argument("--layers", type=int, default=16, help="layers of the 7B-shaped model in part 2")
    ap.add_argument("--qmm-tune", action="store_true", help="let triton_qmm tune its configs (slow)")
    ap.add_argument("--skip-model", action="store_true", help="kernels only")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--skip-kernels", action="store_true", help="decode modes only")
    ap.add_argument("--modes", default="cublas,triton,triton_cx,auto")
    ap.add_argument("--formats", default="bf16,int8,int4g128")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sweep_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    if not args.qmm_tune:
        from falcon_mamba.quant import triton_qmm

        triton_qmm.configure(tune=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rec = {"env": env(), "args": vars(args)}
    t0 = time.time()
    if not args.skip_kernels:
        rec["kernels"] = sweep_kernels(args.budget_s, gen, args.shapes.split(",") if args.shapes else None,
                                       args.formats.split(","))
        rec["kernel_sweep_s"] = time.time() - t0
        print(f"\nkernel sweep: {rec['kernel_sweep_s']:.0f} s")
    if not args.skip_model:
        t1 = time.time()
        rec["decode"] = decode_modes(args.layers, args.modes.split(","), args.formats.split(","))
        rec["decode_s"] = time.time() - t1
        print(f"decode modes: {rec['decode_s']:.0f} s")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
