"""The batched decode step's own kernels timed inside the real decode step, per launch shape: the
many-row SSM update (_ssm_rows_kernel), with --kernel conv the conv step (_conv_step_kernel), with
--kernel xproj the split x_proj (ops/triton_xproj.py, the split_x mode forced).

    PYTHONPATH=. python3 benchmarks/sweep_step_kernels.py [--kernel ssm|conv|xproj] [--layers 16]
        [--batches 64,256] [--configs 128:4,256:4,...] [--out F.json]

Each config (ssm, conv: BD:WARPS, channels per program and warps; xproj: BLOCK_K:PIECE_K:BLOCK_N:
WARPS) is set as the kernel's default, a KernelLoop captures its graphs, and 100 steps are timed
(CUDA events), then 10 more under torch.profiler for the kernel's own time per layer. A config
named after a decode mode (cublas, cublas_lt, ...) times that mode's step as it is, for the
baseline of the same run. In the step, every layer's state is cold (16 layers of 64 rows is
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
from falcon_mamba.decode.modes import MODES, DecodeOptions  # noqa: E402
from falcon_mamba.ops import triton_decode, triton_xproj  # noqa: E402

# (results/h200-sweep-ssm-rows-35a8ab0.json also timed rows per program sharing A's tile, a
# BD:WARPS:ROWS:STAGES launch argument then: removed, slower at every shape)
DEFAULT_CONFIGS = {"ssm": "128:4,128:2,256:4,256:8,512:4,512:8,64:2",
                   "conv": "512:8,256:2,256:4,1024:16,512:4,128:2",
                   "xproj": "cublas,cublas_lt,256:128:32:4,256:256:32:4,512:128:32:4,512:256:32:8,"
                            "128:128:32:4,256:128:64:4,1024:256:32:8"}
# (results/h200-sweep-conv-51d8f9b.txt also timed an EARLY order of the conv step, reading the
# state's taps before the PDL wait, then a third config field: no faster, removed)
# module constants each kernel's launch reads, and the kernel's name in the profile
# (module, its constants a config sets, the kernels' name in the profile, the mode the configs run)
KNOBS = {"ssm": (triton_decode, ("SSM_ROWS_BLOCK_D", "SSM_ROWS_WARPS"), "_ssm_rows_kernel", "auto"),
         "conv": (triton_decode, ("CONV_STEP_BLOCK_D", "CONV_STEP_WARPS"), "_conv_step_kernel", "auto"),
         "xproj": (triton_xproj, ("XPROJ_BLOCK_K", "XPROJ_PIECE_K", "XPROJ_BLOCK_N", "XPROJ_WARPS"),
                   "_xproj_", "split_x")}


@torch.no_grad()
def time_config(model, layers: int, batch: int, ssm_dtype, kernel: str, cfg: tuple[int, ...] | str) -> dict:
    """cfg: the knobs' values, or a decode mode's name (its step as it is)."""
    mod, names, kname, mode = KNOBS[kernel]
    if isinstance(cfg, str):
        mode, cfg, names = cfg, (), ()
    saved = tuple(getattr(mod, n) for n in names)
    for n, v in zip(names, cfg):
        setattr(mod, n, type(getattr(mod, n))(v))
    try:
        loop = KernelLoop(model, batch, DecodeOptions(mode=mode, tuning_cache=""), ssm_dtype=ssm_dtype)
        step_ms, prof = timed_and_profiled(loop, 10)
        per = kernel_totals(prof)
        k_us = sum(t for n, (t, _) in per.items() if kname in n) / 10 / layers
        del loop
        torch.cuda.empty_cache()
    finally:
        for n, v in zip(names, saved):
            setattr(mod, n, v)
    return {"config": ":".join(map(str, cfg)) or mode, "step_ms": step_ms, "kernel_us_per_layer": k_us}


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
    configs = [c if c in MODES else tuple(int(v) for v in c.split(":")) for c in spec.split(",")]
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
            elif args.kernel == "xproj":  # the weight and x read, bf16
                nbytes = (cfg.time_step_rank + 2 * N + batch) * D * 2
            else:  # the conv state (K-1 taps) read and written, x read, y written, bf16
                nbytes = 2 * batch * D * 2 * cfg.conv_kernel
            floor_us = nbytes / (args.copy_tbs * 1e12) * 1e6
            for c in configs:
                try:
                    r = time_config(model, args.layers, batch, ssm_dtype, args.kernel, c)
                except Exception as e:  # noqa: BLE001 - a config that does not compile: report, go on
                    r = {"config": c if isinstance(c, str) else ":".join(map(str, c)),
                         "error": f"{type(e).__name__}: {e}"[:200]}
                r.update(batch=batch, state_dtype=sd, floor_us=floor_us)
                res["rows"].append(r)
                if "error" in r:
                    print(f"{sd:8s} @{batch:3d} {r['config']:12s} ERROR {r['error']}", flush=True)
                elif isinstance(c, str):  # a mode's step as it is: the baseline
                    print(f"{sd:8s} @{batch:3d} {r['config']:12s} step {r['step_ms']:.3f} ms", flush=True)
                else:
                    print(f"{sd:8s} @{batch:3d} {r['config']:12s} step {r['step_ms']:.3f} ms  {args.kernel} "
                          f"{r['kernel_us_per_layer']:6.2f} us/layer (floor {floor_us:5.1f}: "
                          f"{floor_us / r['kernel_us_per_layer']:.0%}; under PDL a duration includes "
                          "the wait for the kernel before)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
