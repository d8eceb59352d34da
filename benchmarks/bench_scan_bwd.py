"""The selective-scan backward on the training shape of the ~1.5B: B 8 x L 2048, D 4096, N 16, bf16
x and z (strided halves of in_proj's output), dt, B and C (slices of x_proj's output), packed-
document resets, no carried state, dhT None (as in `falcon-mamba train`). The default launch
(with --sweep: against length-chunk and window variants) and, with --old, the backward of an earlier commit on
the same inputs in the same run. Prints the table, then one JSON line.

    git show 2d4f3fa:falcon_mamba/ops/triton_scan.py > old_scan.py   # the single-pass backward
    git show a6a7929:falcon_mamba/ops/triton_scan_bwd.py > old_bwd.py  # before the lane sums
    PYTHONPATH=. python3 benchmarks/bench_scan_bwd.py [--old old_scan.py] [--B 1] [--sweep]

Bytes: x, dt, z, dy read and dx, ddt, dz written (bf16), the saved states read (fp32); the
floor they give at the copy rate is beside each time. The recompute scratch is not counted (it
should stay in L2: triton_scan_bwd.py's docstring).
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch
import triton.testing

from falcon_mamba.ops import triton_scan
from falcon_mamba.ops import triton_scan_bwd as tsb

COPY_TBS = 4.14  # H200 device-to-device copy, read + write counted (ENGINEERING.md section 6)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median") * 1e-3  # seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default=None, help="an earlier triton_scan.py (single-pass backward) or "
                                               "triton_scan_bwd.py whose scan_bwd to time too")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--sweep", action="store_true", help="also time length-chunk x window variants")
    p.add_argument("--maxnreg", default=None,
                   help="also time the default launch under these register caps, e.g. 128,168,200")
    a = p.parse_args()
    B, L, D, N, R = a.B, a.L, a.D, 16, 256
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, scale=1.0, shift=0.0: torch.randn(*s, device=dev, generator=g) * scale + shift  # noqa: E731
    xz = r(B, L, 2 * D).bfloat16()
    x, z = xz[..., :D], xz[..., D:]
    xdbl = r(B, L, R + 2 * N).bfloat16()
    Bm, Cm = xdbl[..., R:R + N], xdbl[..., R + N:]
    dt = r(B, L, D, scale=0.5, shift=-1.0).bfloat16()
    A = -torch.exp(r(D, N, scale=0.5))
    Dv, dtb = r(D), r(D, scale=0.5)
    rst = torch.rand(B, L, device=dev, generator=g) < 1 / 512  # ~4 documents per row
    dy = r(B, L, D).bfloat16()
    _, _, chk = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, None, rst, save_chk=True)
    CHK = triton_scan.CHK
    args = (x, dt, A, Bm, Cm, Dv, z, dtb, rst, chk, dy, None, CHK)
    nbytes = 7 * B * L * D * 2 + chk.numel() * 4
    floor = nbytes / (COPY_TBS * 1e12)
    slots = tsb.resident_programs(dev)
    default_cl = tsb.backward_chunk(B, L, D, tsb.BWD_BLOCK_D, CHK, slots)
    rows = []

    def row(name, fn):
        try:
            t = bench(fn)
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the rest still run
            rows.append({"kernel": name, "error": str(e)[:200]})
        else:
            rows.append({"kernel": name, "ms": t * 1e3, "floor_ms": floor * 1e3, "of_floor": floor / t})
        print(rows[-1], flush=True)

    if a.old:
        spec = importlib.util.spec_from_file_location("old_scan", a.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        if hasattr(old, "backward_chunk"):  # a triton_scan_bwd.py of the chunked backward
            row("old scan_bwd", lambda: old.scan_bwd(*args))
            rec_old = old.scan_bwd(*args)
        else:  # a triton_scan.py of the single-pass backward
            row("old scan_bwd (single pass)", lambda: old.scan_bwd(*args[:-1]))
            rec_old = old.scan_bwd(*args[:-1])
    row(f"default (chunk {default_cl}, window {tsb.BWD_WINDOW}; {slots} slots)", lambda: tsb.scan_bwd(*args))
    rec = {"shape": f"B={B} L={L} D={D} N={N}", "bytes": nbytes, "rows": rows, "commit": _commit()}
    if a.old:  # dB, dC: atomics, so not bit-identical run to run
        rec["old_vs_default_rel_err"] = max(
            ((g_.float() - r_.float()).norm() / r_.float().norm().clamp(min=1e-30)).item()
            for g_, r_ in zip(tsb.scan_bwd(*args), rec_old) if g_ is not None and r_ is not None)
    if a.maxnreg:  # fewer registers, more resident programs, some spills (inspect_kernels.py counts them)
        ref = tsb.scan_bwd(*args)
        for cap in (int(v) for v in a.maxnreg.split(",")):
            tsb.BWD_MAXNREG = cap
            row(f"default, maxnreg {cap}", lambda: tsb.scan_bwd(*args))
            got = tsb.scan_bwd(*args)
            rec[f"maxnreg_{cap}_rel_err"] = max(  # dB, dC: atomics, so not bit-identical run to run
                ((g_.float() - r_.float()).norm() / r_.float().norm().clamp(min=1e-30)).item()
                for g_, r_ in zip(got, ref) if g_ is not None)
        tsb.BWD_MAXNREG = None
    if a.sweep:  # each window is its own compiled kernel (~10-20 s each on Triton 3.6)
        for cl in sorted({L, 1024, 512, 256, CHK}):
            for w in (CHK, 32, 16, 8):
                row(f"chunk {cl} window {w}", lambda cl=cl, w=w: tsb.scan_bwd(*args, chunk=cl, window=w))
        ref = tsb.scan_bwd(*args, chunk=L, window=CHK)
        got = tsb.scan_bwd(*args)
        rec["default_vs_single_chunk_rel_err"] = max(
            ((g_.float() - r_.float()).norm() / r_.float().norm().clamp(min=1e-30)).item()
            for g_, r_ in zip(got, ref) if g_ is not None)
    print(json.dumps(rec))


def _commit() -> str | None:
    import os
    import subprocess
    if os.environ.get("FALCON_MAMBA_COMMIT"):  # the device machine's copy has no .git
        return os.environ["FALCON_MAMBA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    main()
