"""Launch choices of the batch-1 decode step, timed in the graphed step per format (GPU): for int4
the merged x_proj mode (triton_gemv_xp) against triton_gemv, the packed GEMVs' first block before or
after the PDL wait; for every format the SSM step's channels per program and the norm's warps.

    PYTHONPATH=. python3 benchmarks/sweep_xproj.py [--layers 16] [--formats int4,bf16,int8] [--out F.json]

A random Falcon Mamba 7B-shaped model (--layers layers; int8 / int4 g128 through quantize_model);
for each variant: the int4 tiles (triton_gemv.TUNED, GemvConfig.pre) and triton_decode's batch-1
constants set in this process, the kernel loop with the mode and PDL forced, 200 greedy steps timed by
CUDA events (3 repeats, best); each format's first variant is timed again last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from profile_decode import in_format, random_7b  # noqa: E402

from falcon_mamba.decode import step as S  # noqa: E402
from falcon_mamba.decode.loop import KernelLoop  # noqa: E402
from falcon_mamba.decode.modes import DecodeOptions  # noqa: E402
from falcon_mamba.ops import triton_decode as D  # noqa: E402
from falcon_mamba.ops import triton_gemv as G  # noqa: E402
from falcon_mamba.ops import triton_gemv_i4 as I  # noqa: E402

# (label, mode, first block before the PDL wait in (in_proj, out_proj, lm_head) (None: as tuned),
# module constants set for the variant: D triton_decode, S decode/step.py, I triton_gemv_i4)
T = (None, None, None)
VARIANTS = {
    "int4": [
        ("base", "triton", T, {}),
        ("xp", "triton_xp", T, {}),
        ("xp, lm_head first block after the wait", "triton_xp", (None, None, False), {}),
        ("xp, ssm 8 channels", "triton_xp", T, {"S.XP_SSM_BLOCK_D": 8}),
        ("xp, ssm 32 channels", "triton_xp", T, {"S.XP_SSM_BLOCK_D": 32}),
        ("xp, ssm 8 warps", "triton_xp", T, {"D.SSM_WARPS": 8}),
        ("xp, x_proj programs 4 x 2048", "triton_xp", T, {"I.XP_BN": 4, "I.XP_BK": 2048}),
        ("xp, x_proj programs 16 x 512", "triton_xp", T, {"I.XP_BN": 16, "I.XP_BK": 512}),
        ("xp again", "triton_xp", T, {}),
    ],
    "bf16": [
        ("cx", "triton_cx", T, {}),
        ("cx, ssm 16 channels", "triton_cx", T, {"D.SSM_BLOCK_D": 16}),
        ("cx, rms 8 warps", "triton_cx", T, {"D.RMS_WARPS_B1": 8}),
        ("cx again", "triton_cx", T, {}),
    ],
    "int8": [
        ("triton", "triton", T, {}),
        ("triton, ssm 16 channels", "triton", T, {"D.SSM_BLOCK_D": 16}),
        ("triton, rms 8 warps", "triton", T, {"D.RMS_WARPS_B1": 8}),
        ("triton again", "triton", T, {}),
    ],
}
MODULES = {"D": D, "S": S, "I": I}


@torch.no_grad()
def step_ms(model, mode: str) -> float:
    loop = KernelLoop(model, 1, DecodeOptions(mode=mode, pdl="on", tuning_cache=""))
    loop.run(5)
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loop.run(200)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 200)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--formats", default="int4")
    ap.add_argument("--out")
    args = ap.parse_args()
    base = random_7b(args.layers)
    keys = {k: G.TUNED[k] for k in (("int4g128", 16384, 4096, False), ("int4g128", 4096, 8192, False),
                                    ("int4g128", 65024, 4096, False))}
    kin, kout, klm = keys
    knobs = {k for v in VARIANTS.values() for *_, c in v for k in c}
    defaults = {k: getattr(MODULES[k[0]], k[2:]) for k in knobs}
    res = {"layers": args.layers, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "commit": os.environ.get("FALCON_MAMBA_COMMIT"), "runs": []}
    for fmt in args.formats.split(","):
        model = in_format(base, fmt)
        for label, mode, (pin, pout, plm), consts in VARIANTS[fmt]:
            for k, v in {**defaults, **consts}.items():
                setattr(MODULES[k[0]], k[2:], v)
            for k, pre in ((kin, pin), (kout, pout), (klm, plm)):
                G.TUNED[k] = keys[k] if pre is None else replace(keys[k], pre=pre)
            try:
                ms = step_ms(model, mode)
                rec = {"format": fmt, "label": label, "ms": ms, "us_per_layer": ms * 1e3 / args.layers}
            except Exception as e:  # recorded, not fatal
                first = str(e).splitlines()[0][:200] if str(e) else ""
                rec = {"format": fmt, "label": label, "error": f"{type(e).__name__}: {first}"}
            res["runs"].append(rec)
            print(rec, flush=True)
        if model is not base:
            del model
            torch.cuda.empty_cache()
    G.TUNED.update(keys)
    for k, v in defaults.items():
        setattr(MODULES[k[0]], k[2:], v)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
