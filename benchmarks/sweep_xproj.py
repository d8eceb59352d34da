"""The int4 decode mode with x_proj merged into the packed in_proj launch (triton_gemv_xp): its
first weight block loaded before or after the PDL wait per packed GEMV and the small kernels' launch
shapes, timed in the graphed batch-1 step (GPU).

    PYTHONPATH=. python3 benchmarks/sweep_xproj.py [--layers 16] [--out F.json]

A random Falcon Mamba 7B-shaped model (--layers layers, int4 g128 through quantize_model); for each
variant: the in_proj, out_proj, lm_head tiles (triton_gemv.TUNED, GemvConfig.pre) and the norm and
SSM-step kernels' launch constants (triton_decode) set in this process,
GraphDecoder with the mode and PDL forced, 200 greedy steps timed by CUDA events (3 repeats, best).
The unmerged triton_gemv + PDL step is timed first and last as the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.config import PRESETS  # noqa: E402
from falcon_mamba.decode_graph import GraphDecoder  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.ops import triton_decode as D  # noqa: E402
from falcon_mamba.ops import triton_gemv as G  # noqa: E402
from falcon_mamba.quant import quantize_model  # noqa: E402

# (label, mode, first block before the PDL wait in (in_proj, out_proj, lm_head), triton_decode
# constants set for the variant)
T = (True, True, True)
VARIANTS = [
    ("base", "triton", T, {}),
    ("xp", "triton_xp", T, {}),
    ("xp, out_proj after the wait", "triton_xp", (True, False, True), {}),
    ("xp, in_proj after the wait", "triton_xp", (False, True, True), {}),
    ("xp, in_proj and out_proj after the wait", "triton_xp", (False, False, True), {}),
    ("xp, rms 4 warps", "triton_xp", T, {"RMS_WARPS": 4}),
    ("xp, rms 16 warps", "triton_xp", T, {"RMS_WARPS": 16}),
    ("xp, ssm 16 channels", "triton_xp", T, {"SSM_BLOCK_D": 16}),
    ("xp, ssm 64 channels", "triton_xp", T, {"SSM_BLOCK_D": 64}),
    ("xp, ssm 8 warps", "triton_xp", T, {"SSM_WARPS": 8}),
    ("xp, ssm 2 warps", "triton_xp", T, {"SSM_WARPS": 2}),
    ("xp again", "triton_xp", T, {}),
    ("base again", "triton", T, {}),
]


@torch.no_grad()
def step_ms(model) -> float:
    dec = GraphDecoder(model)
    state = model.new_state(1)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    dec.greedy(tok, state, 5)
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.greedy(tok, state, 200)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 200)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = PRESETS["falcon-mamba-7b"].replace(num_hidden_layers=args.layers)
    with torch.device("cuda"):
        model = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    quantize_model(model, 4, 128)
    os.environ["FALCON_MAMBA_PDL"] = "1"
    keys = {k: G.TUNED[k] for k in (("int4g128", 16384, 4096, False), ("int4g128", 4096, 8192, False),
                                    ("int4g128", 65024, 4096, False))}
    kin, kout, klm = keys
    res = {"layers": args.layers, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "commit": os.environ.get("FALCON_MAMBA_COMMIT"), "runs": []}
    defaults = {k: getattr(D, k) for k in ("RMS_WARPS", "SSM_BLOCK_D", "SSM_WARPS")}
    for label, mode, (pin, pout, plm), consts in VARIANTS:
        os.environ["FALCON_MAMBA_GEMV"] = mode
        for k, v in {**defaults, **consts}.items():
            setattr(D, k, v)
        G.TUNED[kin] = replace(keys[kin], pre=pin)
        G.TUNED[kout] = replace(keys[kout], pre=pout)
        G.TUNED[klm] = replace(keys[klm], pre=plm)
        try:
            ms = step_ms(model)
            rec = {"label": label, "ms": ms, "us_per_layer": ms * 1e3 / args.layers}
        except Exception as e:  # recorded, not fatal
            rec = {"label": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        res["runs"].append(rec)
        print(rec, flush=True)
    G.TUNED.update(keys)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
