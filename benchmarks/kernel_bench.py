"""Kernel-level timings on the GPU, Falcon Mamba 7B shapes (bf16): the conv forward, the inference
scan's length chunk, and the pieces of one decode step. Prints a table, then one JSON line.

    PYTHONPATH=. python3 benchmarks/kernel_bench.py [--parts conv,decode,...,ssmrows] [--out kernels.json]

Each figure comes with the bytes it must move and the bandwidth that implies, to compare with the
measured copy rate (ENGINEERING.md section 6: 3.01 TB/s on the lent H100).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from falcon_mamba.ops import triton_backend, triton_conv, triton_scan


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median") * 1e-3  # seconds


def conv_fwd_part(rows, L=16384, D=8192):
    """The causal conv forward at a 16k prompt (x a strided half of in_proj's output, as in the
    model). The scan forward's launches are timed by bench_scan_fwd.py, its backward by
    bench_scan_bwd.py."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    xz = torch.randn(1, L, 2 * D, device=dev, generator=g).bfloat16()
    w = torch.randn(D, 4, device=dev, generator=g).bfloat16()
    bias = torch.randn(D, device=dev, generator=g).bfloat16()
    t = bench(lambda: triton_conv.conv_fwd(xz[..., :D], w, bias, None, True))
    rows.append({"kernel": "conv_fwd (strided x)", "shape": f"B=1 L={L} D={D}", "ms": t * 1e3,
                 "GB/s": 2 * L * D * 2 / t / 1e9})


def scan_infer_chunks(rows, D=8192, N=16):
    """The inference scan (no saved states: a prompt chunk's) at batch 1 by length chunk: the
    chunk infer_chunk() picks against shorter and longer ones."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, scale=1.0, shift=0.0: torch.randn(*s, device=dev, generator=g) * scale + shift  # noqa
    A = -torch.exp(r(D, N, scale=0.5))
    Dv, dtb = r(D), r(D, scale=0.5)
    for L in (128, 256, 576, 1024, 2048, 4096, 16384):
        xz = r(1, L, 2 * D).bfloat16()
        x, z = xz[..., :D], xz[..., D:]
        dt = r(1, L, D, scale=0.5, shift=-1).bfloat16()
        xdbl = r(1, L, 256 + 2 * N).bfloat16()
        Bm, Cm = xdbl[..., 256:256 + N], xdbl[..., 256 + N:]
        h0 = torch.zeros(1, D, N, device=dev)
        ts = triton_scan
        picked = ts.infer_chunk(1, L, D, ts.FWD_BLOCK_D, ts.FWD_UNROLL)
        for chunk in sorted({16, 32, 64, 128, 256, 512, picked, L}):
            if chunk > L:
                continue
            args = (x, dt, A, Bm, Cm, Dv, z, dtb, h0)
            t = bench(lambda chunk=chunk, args=args: triton_scan.scan_fwd(*args, chunk=chunk), reps=30)
            mark = " (picked)" if chunk == picked else ""
            rows.append({"kernel": f"scan_fwd inference chunk={chunk}{mark}",
                         "shape": f"B=1 L={L} D={D}", "ms": t * 1e3, "us_per_token": t * 1e6 / L})
            print(rows[-1], flush=True)


def decode_pieces(rows, B, H=4096, D=8192, N=16, R=256, V=65024):
    dev = "cuda"
    bf = torch.bfloat16
    u = torch.randn(B, H, device=dev, dtype=bf)
    W_in = torch.randn(2 * D, H, device=dev, dtype=bf)
    W_out = torch.randn(H, D, device=dev, dtype=bf)
    W_x = torch.randn(R + 2 * N, D, device=dev, dtype=bf)
    W_head = torch.randn(V, H, device=dev, dtype=bf)
    xz = torch.nn.functional.linear(u, W_in)
    for name, fn, nbytes in [
        ("in_proj GEMM", lambda: torch.nn.functional.linear(u, W_in), W_in.numel() * 2),
        ("out_proj GEMM", lambda: torch.nn.functional.linear(xz[:, :D], W_out), W_out.numel() * 2),
        ("x_proj GEMM", lambda: torch.nn.functional.linear(xz[:, :D], W_x), W_x.numel() * 2),
        ("lm_head GEMM", lambda: torch.nn.functional.linear(u, W_head), W_head.numel() * 2),
    ]:
        t = bench(fn)
        rows.append({"kernel": name, "shape": f"B={B}", "us": t * 1e6, "GB/s": nbytes / t / 1e9})
    conv = torch.randn(B, 3, D, device=dev, dtype=bf)
    w, b = torch.randn(D, 4, device=dev, dtype=bf), torch.randn(D, device=dev, dtype=bf)
    t = bench(lambda: triton_backend.conv_step(conv, xz[:, :D], w, b))
    rows.append({"kernel": "conv_step", "shape": f"B={B}", "us": t * 1e6})
    st = torch.randn(B, D, N, device=dev)
    xdbl = torch.randn(B, R + 2 * N, device=dev, dtype=bf)
    W_dt = torch.randn(D, R, device=dev, dtype=bf) * 0.06
    A_log, Dv, dtb = torch.randn(D, N, device=dev), torch.randn(D, device=dev), torch.randn(D, device=dev)
    t = bench(lambda: triton_backend.mixer_ssm_step(st, xz[:, :D], xz[:, D:], xdbl, W_dt, dtb, A_log,
                                                    Dv, 1e-6))
    rows.append({"kernel": "fused ssm step (norms+dt_proj+scan+gate)", "shape": f"B={B}",
                 "us": t * 1e6, "GB/s": (W_dt.numel() * 2 + 2 * st.numel() * 4) / t / 1e9})
    h = torch.randn(B, H, device=dev)
    o = torch.randn(B, H, device=dev, dtype=bf)
    wn = torch.randn(H, device=dev, dtype=bf)
    t = bench(lambda: triton_backend.add_rms_norm(h, o, wn, 1e-5, round_to=bf, h_out=h))
    rows.append({"kernel": "add+rmsnorm", "shape": f"B={B}", "us": t * 1e6})


def gemv_variants(rows):
    """The batch-1 projections: cuBLAS against the Triton GEMV at a few tile shapes."""
    from falcon_mamba.ops import triton_decode

    dev, bf = "cuda", torch.bfloat16
    for name, (N, K) in (("in_proj", (16384, 4096)), ("out_proj", (4096, 8192)),
                         ("x_proj", (288, 8192)), ("lm_head", (65024, 4096))):
        x = torch.randn(1, K, device=dev, dtype=bf)
        W = torch.randn(N, K, device=dev, dtype=bf)
        ref = torch.nn.functional.linear(x, W).float()
        t = bench(lambda: torch.nn.functional.linear(x, W))  # noqa: B023
        rows.append({"kernel": f"{name} cuBLAS", "us": t * 1e6, "GB/s": W.numel() * 2 / t / 1e9})
        for bn, bk, w, st in [(8, 512, 4, 4), (4, 1024, 4, 4), (8, 512, 8, 3), (2, 2048, 4, 3),
                              (16, 512, 8, 3), (4, 512, 4, 6), (8, 256, 4, 8), (2, 1024, 2, 4),
                              (1, 2048, 4, 4), (4, 2048, 8, 3), (32, 256, 8, 3), (16, 1024, 8, 2)]:
            def fn(bn=bn, bk=bk, w=w, st=st, x=x, W=W):
                return triton_decode.gemv(x, W, bn=bn, bk=bk, num_warps=w, num_stages=st)
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                t = bench(fn)
            except Exception as e:  # noqa: BLE001 - one failing config does not end the sweep
                rows.append({"kernel": f"{name} gemv bn={bn} bk={bk} w={w} s={st}", "error": str(e)[:100]})
                continue
            rows.append({"kernel": f"{name} triton gemv bn={bn} bk={bk} w={w} s={st}", "us": t * 1e6,
                         "GB/s": W.numel() * 2 / t / 1e9, "rel_err": err})


def graph_profile(rows):
    """Per-kernel GPU time inside one graphed decode step of the 7B model (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from falcon_mamba.cli._bench_util import build_ours
    from falcon_mamba.config import get_preset
    from falcon_mamba.decode.loop import KernelLoop

    model = build_ours(get_preset("falcon-mamba-7b"), torch.bfloat16, torch.device("cuda"))
    for B in (1, 64):
        loop = KernelLoop(model, B)
        loop.run(3)
        reps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                loop.graphs.step(B)
            torch.cuda.synchronize()
        agg = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = e.name[:60]
                c = agg.setdefault(k, [0.0, 0])
                c[0] += e.device_time / reps
                c[1] += 1
        total = sum(v[0] for v in agg.values())
        rows.append({"kernel": f"graph step B={B} total kernel time", "us": total, **loop.mode})
        for k, (us, cnt) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:10]:
            rows.append({"kernel": f"  B={B} {k}", "us": us, "launches_per_step": cnt / reps})
        del loop


def prefill_profile(rows, L=16384):
    """Per-kernel GPU time of one 16k-token parallel prefill of the 7B shapes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from falcon_mamba.cli._bench_util import build_ours
    from falcon_mamba.config import get_preset

    model = build_ours(get_preset("falcon-mamba-7b"), torch.bfloat16, torch.device("cuda"))
    ids = torch.randint(0, 65024, (1, L), device="cuda")
    for _ in range(2):
        model(ids, last_only=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, last_only=True)
        torch.cuda.synchronize()
    agg = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            c = agg.setdefault(e.name[:70], [0.0, 0])
            c[0] += e.device_time
            c[1] += 1
    total = sum(v[0] for v in agg.values())
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    model(ids, last_only=True)
    t1.record()
    t1.synchronize()
    rows.append({"kernel": f"prefill L={L} total kernel time", "ms": total / 1e3,
                 "wall_ms": t0.elapsed_time(t1)})
    for k, (us, cnt) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:14]:
        rows.append({"kernel": f"  prefill {k}", "ms": us / 1e3, "launches": cnt})
    del model


def ssm_step_variants(rows, D=8192, N=16, R=256, H=4096):
    """Batch-1 decode kernels other than the projections, timed inside CUDA graphs (do_bench
    without graphs measures the ~20 us host launch instead): the fused SSM step at several tile
    shapes, the conv step and add+RMSNorm."""
    from triton.testing import do_bench_cudagraph

    from falcon_mamba.ops import triton_decode

    dev, bf = "cuda", torch.bfloat16
    st = torch.randn(1, D, N, device=dev)
    xz = torch.randn(1, 2 * D, device=dev, dtype=bf)
    xdbl = torch.randn(1, R + 2 * N, device=dev, dtype=bf)
    W_dt = torch.randn(D, R, device=dev, dtype=bf) * 0.06
    A_log, Dv, dtb = torch.randn(D, N, device=dev), torch.randn(D, device=dev), torch.randn(D, device=dev)
    x, z = xz[:, :D], xz[:, D:]
    ref = None
    for bd, rb, w in [(64, 64, 4), (32, 256, 4), (16, 256, 4), (16, 256, 2), (32, 128, 4), (8, 256, 2),
                      (16, 128, 2), (32, 256, 8), (64, 256, 8)]:
        def fn(bd=bd, rb=rb, w=w):
            return triton_decode.ssm_step(st, x, xdbl[:, :R], A_log, xdbl[:, R:R + N],
                                          xdbl[:, R + N:], Dv, z, dtb, W_dt=W_dt, norm_eps=1e-6,
                                          a_is_log=True, block_d=bd, rb=rb, num_warps=w)
        try:
            s0 = st.clone()
            y = fn()
            st.copy_(s0)
            if ref is None:
                ref = y.float()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t = do_bench_cudagraph(fn, rep=50) * 1e-3
        except Exception as e:  # noqa: BLE001
            rows.append({"kernel": f"ssm_step bd={bd} rb={rb} w={w}", "error": str(e)[:160]})
            continue
        rows.append({"kernel": f"ssm_step bd={bd} rb={rb} w={w} (graph)", "us": t * 1e6, "rel_err": err})
        print(rows[-1], flush=True)
    conv = torch.randn(1, 3, D, device=dev, dtype=bf)
    cw, cb = torch.randn(D, 4, device=dev, dtype=bf), torch.randn(D, device=dev, dtype=bf)
    t = do_bench_cudagraph(lambda: triton_decode.conv_step(conv, x, cw, cb), rep=50) * 1e-3
    rows.append({"kernel": "conv_step (graph)", "us": t * 1e6})
    h = torch.randn(1, H, device=dev)
    o = torch.randn(1, H, device=dev, dtype=bf)
    wn = torch.randn(H, device=dev, dtype=bf)
    t = do_bench_cudagraph(lambda: triton_backend.add_rms_norm(h, o, wn, 1e-5, round_to=bf, h_out=h),
                           rep=50) * 1e-3
    rows.append({"kernel": "add+rmsnorm (graph)", "us": t * 1e6})


def ssm_rows_variants(rows, D=8192, N=16, R=256, copy_tbs=4.14):
    """The decode step's SSM update above DT_PROJ_MAX_BATCH rows (_ssm_rows_kernel: dt from one GEMM)
    at 64 and 256 rows, inside CUDA graphs: channels per program x warps. The floor is the state's
    read + write at the copy rate (ENGINEERING.md section 6: 4.14 TB/s on the H200, read + write
    counted). Each variant starts from the same state; rel_err is its first call's y against the
    first variant's."""
    for B in (64, 256):
        _ssm_rows_at(rows, B, D, N, R, copy_tbs)


def _ssm_rows_at(rows, B, D, N, R, copy_tbs):
    from triton.testing import do_bench_cudagraph

    from falcon_mamba.ops import triton_decode

    dev, bf = "cuda", torch.bfloat16
    st = torch.randn(B, D, N, device=dev)
    s0 = st.clone()  # every variant's first call starts here (the timed replays advance st)
    xz = torch.randn(B, 2 * D, device=dev, dtype=bf)
    dt = torch.randn(B, D, device=dev, dtype=bf)
    xdbl = torch.randn(B, R + 2 * N, device=dev, dtype=bf)
    A_log, Dv, dtb = torch.randn(D, N, device=dev), torch.randn(D, device=dev), torch.randn(D, device=dev)
    floor_us = 2 * st.numel() * 4 / (copy_tbs * 1e12) * 1e6
    ref = None
    for bd, w in [(256, 4), (512, 8), (512, 4), (256, 2), (128, 4), (128, 2), (1024, 8)]:
        def fn(bd=bd, w=w):
            return triton_decode.ssm_step(st, xz[:, :D], dt, A_log, xdbl[:, R:R + N], xdbl[:, R + N:], Dv,
                                          xz[:, D:], dtb, norm_eps=1e-6, a_is_log=True, block_d=bd,
                                          num_warps=w)
        name = f"ssm rows B={B} bd={bd} w={w} (graph)"
        try:
            st.copy_(s0)
            y = fn()
            ref = y.float() if ref is None else ref
            err = ((y.float() - ref).norm() / ref.norm()).item()
            us = do_bench_cudagraph(fn, rep=50) * 1e3  # ms -> us
        except Exception as e:  # noqa: BLE001
            rows.append({"kernel": name, "error": str(e)[:160]})
            continue
        rows.append({"kernel": name, "us": us, "floor_us": floor_us, "of_floor": floor_us / us,
                     "rel_err": err})
        print(rows[-1], flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--parts", default="conv,decode,gemv,graph,prefill")
    args = p.parse_args()
    rows = []
    props = torch.cuda.get_device_properties(0)
    table = {"conv": conv_fwd_part, "decode": lambda r: [decode_pieces(r, B) for B in (1, 64)],
             "gemv": gemv_variants, "graph": graph_profile, "prefill": prefill_profile,
             "ssm": ssm_step_variants, "scaninfer": scan_infer_chunks, "ssmrows": ssm_rows_variants}
    for part in [table[k] for k in args.parts.split(",")]:
        try:
            part(rows)
        except Exception as e:  # noqa: BLE001 - report and go on: one device call, many parts
            import traceback

            traceback.print_exc()
            rows.append({"kernel": "ERROR", "error": f"{type(e).__name__}: {e}"[:300]})
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    rec = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    print(json.dumps(rec))


if __name__ == "__main__":
    with torch.no_grad():
        main()
