"""The conv backward (issue 18) on the training shape of the ~1.5B: B 8 x L 2048, D 4096, K 4, bf16 x
(the strided half of in_proj's output) and dy, fp32 weight and bias, packed-document resets, no
carried state, the final state's gradient None (as in `falcon-mamba train`). Triton kernel against
its PyTorch twin and a device copy of the same bytes, in one run; then a sweep of the kernel's
tiles. Prints the table, then one JSON line.

    PYTHONPATH=. python3 benchmarks/bench_conv_bwd.py [--sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import torch
import triton.testing

from falcon_mamba.ops import triton_conv
from falcon_mamba.ops import triton_conv_bwd as tcb


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3  # seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time other (BL, BD, CHUNK, warps)")
    p.add_argument("--quick", action="store_true", help="also time four other tiles")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--D", type=int, default=4096)
    a = p.parse_args()
    B, L, D, K = a.B, a.L, a.D, 4
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    x = r(B, L, 2 * D).bfloat16()[..., :D]
    w, b = r(D, K) * 0.5, r(D)
    dy = r(B, L, D).bfloat16()
    rst = torch.rand(B, L, device=dev, generator=g) < 1 / 500
    rst[:, 0] = True
    args = (x, w, b, None, rst, True, dy, None)

    def moved(chunk):  # bytes the kernel must move: x, dy in, dx out, fp32 dw/db partials out + in
        n_part = B * -(-L // chunk)
        return 3 * B * L * D * 2 + 2 * n_part * D * (K + 1) * 4

    rows = []

    def add(row):  # printed at once: a run cut short by its time limit keeps what it measured
        rows.append(row)
        print(row, flush=True)
    # a copy of 1.5 x B*L*D bf16 moves the bytes of x + dy in and dx out (read + write counted)
    src = torch.empty(3 * B * L * D // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    copy_rate = 2 * src.numel() * 2 / t_copy
    add({"what": "device copy, same bytes", "ms": t_copy * 1e3, "TB/s": copy_rate / 1e12})
    got = tcb.conv_bwd(*args)
    want = triton_conv.conv_bwd_reference(*args)
    err = {n: ((u.float() - v.float()).abs().max() / v.float().abs().max().clamp(min=1)).item()
           for n, u, v in zip(("dx", "dw", "db"), got, want)}
    t_ref = bench(lambda: triton_conv.conv_bwd_reference(*args))
    add({"what": "conv_bwd_reference (PyTorch, the old backward)", "ms": t_ref * 1e3,
                 "TB/s": moved(tcb.CHUNK) / t_ref / 1e12})
    t_fwd = bench(lambda: triton_conv.conv_fwd(x, w, b, None, True, rst))
    add({"what": "conv_fwd (for scale)", "ms": t_fwd * 1e3,
                 "TB/s": 2 * B * L * D * 2 / t_fwd / 1e12})
    configs = [(tcb.BLOCK_L, tcb.BLOCK_D, tcb.CHUNK, tcb.WARPS)]
    if a.quick:
        configs += [(16, 32, 256, 2), (16, 64, 128, 4), (8, 64, 256, 4), (16, 64, 512, 4), (16, 32, 256, 4),
                    (16, 128, 256, 8)]
    if a.sweep:
        configs += [(bl, bd, ch, wp) for bl in (16, 32, 64) for bd in (64, 128, 256)
                    for ch in (128, 256, 512) for wp in (4, 8)
                    if (bl, bd, ch, wp) != configs[0] and ch >= bl and bl * bd <= 8192]
    default = configs[0]
    for cfg in configs:
        tcb.BLOCK_L, tcb.BLOCK_D, tcb.CHUNK, tcb.WARPS = cfg
        try:
            t = bench(lambda: tcb.conv_bwd(*args))
            same = all(torch.equal(u, v) for u, v in zip(tcb.conv_bwd(*args)[:1], got[:1]))
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
            add({"what": f"conv_bwd BL,BD,CHUNK,warps={cfg}", "error": str(e)[:200]})
            continue
        add({"what": f"conv_bwd BL,BD,CHUNK,warps={cfg}", "ms": t * 1e3,
                     "TB/s": moved(cfg[2]) / t / 1e12, "frac_of_copy": moved(cfg[2]) / t / copy_rate,
                     "dx_same_as_default": same})
    tcb.BLOCK_L, tcb.BLOCK_D, tcb.CHUNK, tcb.WARPS = default
    commit = os.environ.get("FALCON_MAMBA_COMMIT") or subprocess.run(  # the device copy has no .git
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bench": "conv_bwd", "gpu": torch.cuda.get_device_name(), "commit": commit,
                      "torch": torch.__version__, "triton": triton.__version__,
                      "shape": f"B={B} L={L} D={D} K={K}", "bytes_default": moved(default[2]),
                      "max_rel_err_vs_twin": err, "rows": rows}))


if __name__ == "__main__":
    main()
