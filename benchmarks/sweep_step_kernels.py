"""The batched decode step's own kernels timed inside the real decode step, per launch shape: the
many-row SSM update (_ssm_rows_kernel) or, with --kernel conv, the conv step (_conv_step_kernel).

    PYTHONPATH=. python3 benchmarks/sweep_step_kernels.py [--kernel ssm|conv] [--layers 16]
        [--batches 64,256] [--configs 128:4,256:4,...] [--out F.json]

Each config BD:WARPS (channels per program and warps) is set as the kernel's default, a KernelLoop captures
its graphs, and 100 steps are timed (CUDA events), then 10 more under torch.profiler for the
kernel's own time per layer. In the step, every layer's state is cold (16 layers of 64 rows is
536 MB of fp32 state against a 60 MB L2), unlike a loop over one layer's state (kernel_bench.py
--parts ssmrows), where 64 rows' 34 MB stayed in L2. Floor: the state read and written at the
copy rate (--copy-tbs, the H200's measured 4.14 TB/s by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from profile_decode import kernel_totals, random_7b, timed_and_profiled  # noqa: E402

from falcon_mamba.decode.loop import KernelLoop  # noqa: E402
from falcon_mamba.ops import triton_decode  # noqa: E402

# (results/h200-sweep-ssm-rows-35a8ab0.json also timed rows per program sharing A's tile, a
# BD:WARPS:ROWS:STAGES launch argument then: removed, slower at every shape)
DEFAULT_CONFIGS = {"ssm": "128:4,128:2,256:4,256:8,512:4,512:8,64:2",
                   "conv": "512:8,256:2,256:4,1024:16,512:4,128:2"}
# (results/h200-sweep-conv-51d8f9b.txt also timed an EARLY order of the conv step, reading the
# state's taps before the PDL wait, then a third config field: no faster, removed)
# module constants each kernel's launch reads, and the kernel's name in the profile
KNOBS = {"ssm": (("SSM_ROWS_BLOCK_D", "SSM_ROWS_WARPS"), "_ssm_rows_kernel"),
         "conv": (("CONV_STEP_BLOCK_D", "CONV_STEP_WARPS"), "_conv_step_kernel")}


@torch.no_grad()
def time_config(model, layers: int, batch: int, ssm_dtype, kernel: str, cfg: tuple[int, ...]) -> dict:
    names, kname = KNOBS[kernel]
    saved = tuple(getattr(triton_decode, n) for n in names)
    for n, v in zip(names, cfg):
        setattr(triton_decode, n, type(getattr(triton_decode, n))(v))
    try:
        loop = KernelLoop(model, batch, ssm_dtype=ssm_dtype)
        step_ms, prof = timed_and_profiled(loop, 10)
        per = kernel_totals(prof)
        k_us = sum(t for n, (t, _) in per.items() if kname in n) / 10 / layers
        del loop
        torch.cuda.empty_cache()
    finally:
        for n, v in zip(names, saved):
            setattr(triton_decode, n, v)
    return {"config": ":".join(map(str, cfg)), "step_ms": step_ms, "kernel_us_per_layer": k_us}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--state-dtypes", default="float32,bfloat16")
    ap.add_argument("--kernel", default="ssm", choices=sorted(KNOBS))
    ap.add_argument("--configs", default=None, help="BD:WARPS,... (default: the kernel's list)")
    ap.add_argument("--copy-tbs", type=float, default=4.14)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = random_7b(args.layers)
    cfg = model.config
    D, N = cfg.intermediate_size, cfg.state_size
    spec = args.configs or DEFAULT_CONFIGS[args.kernel]
    configs = [tuple(int(v) for v in c.split(":")) for c in spec.split(",")]
    res = {"gpu": torch.cuda.get_device_name(0), "commit": os.environ.get("FALCON_MAMBA_COMMIT"),
           "torch": torch.__version__, "layers": args.layers, "copy_tbs": args.copy_tbs,
           "kernel": args.kernel, "rows": []}
    import triton

    res["triton"] = triton.__version__
    for sd in args.state_dtypes.split(","):
        ssm_dtype = getattr(torch, sd)
        for batch in (int(b) for b in args.batches.split(",")):
            if args.kernel == "ssm":  # the state read and written
                nbytes = 2 * batch * D * N * ssm_dtype.itemsize
            else:  # the conv state (K-1 taps) read and written, x read, y written, bf16
                nbytes = 2 * batch * D * 2 * cfg.conv_kernel
            floor_us = nbytes / (args.copy_tbs * 1e12) * 1e6
            for c in configs:
                try:
                    r = time_config(model, args.layers, batch, ssm_dtype, args.kernel, c)
                except Exception as e:  # noqa: BLE001 - a config that does not compile: report, go on
                    r = {"config": ":".join(map(str, c)), "error": f"{type(e).__name__}: {e}"[:200]}
                r.update(batch=batch, state_dtype=sd, floor_us=floor_us)
                res["rows"].append(r)
                if "error" in r:
                    print(f"{sd:8s} @{batch:3d} {r['config']:12s} ERROR {r['error']}", flush=True)
                else:
                    print(f"{sd:8s} @{batch:3d} {r['config']:12s} step {r['step_ms']:.3f} ms  {args.kernel} "
                          f"{r['kernel_us_per_layer']:6.2f} us/layer (floor {floor_us:5.1f}: "
                          f"{floor_us / r['kernel_us_per_layer']:.0%})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
