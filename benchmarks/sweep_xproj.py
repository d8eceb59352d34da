"""The int4 decode mode with x_proj merged into the packed in_proj launch (triton_gemv_xp): its
x_proj program shape, the in_proj tile and the out_proj / lm_head preload-all tiles, timed in the
graphed batch-1 step (GPU).

    PYTHONPATH=. python3 benchmarks/sweep_xproj.py [--layers 16] [--out F.json]

A random Falcon Mamba 7B-shaped model (--layers layers, int4 g128 through quantize_model); for each
variant: triton_gemv_i4.XP_BN / XP_BK and the in_proj, out_proj, lm_head tiles (triton_gemv.TUNED) set
in this process,
GraphDecoder with the mode and PDL forced, 200 greedy steps timed by CUDA events (3 repeats, best).
The unmerged triton_gemv + PDL step is timed first and last as the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba.config import PRESETS  # noqa: E402
from falcon_mamba.decode_graph import GraphDecoder  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.ops import triton_gemv as G  # noqa: E402
from falcon_mamba.ops import triton_gemv_i4 as I  # noqa: E402
from falcon_mamba.quant import quantize_model  # noqa: E402

# (label, mode, XP_BN, XP_BK, in_proj tile (bn, bk), out_proj tile (bn, bk, preall), lm_head preall)
VARIANTS = [
    ("base", "triton", 8, 1024, (8, 1024), (4, 2048, False), False),
    ("xp", "triton_xp", 8, 1024, (8, 1024), (4, 2048, False), False),
    ("xp, out_proj preall bn4 bk2048", "triton_xp", 8, 1024, (8, 1024), (4, 2048, True), False),
    ("xp, out_proj preall bn4 bk1024", "triton_xp", 8, 1024, (8, 1024), (4, 1024, True), False),
    ("xp, out_proj preall bn8 bk2048", "triton_xp", 8, 1024, (8, 1024), (8, 2048, True), False),
    ("xp, out_proj preall bn8 bk1024", "triton_xp", 8, 1024, (8, 1024), (8, 1024, True), False),
    ("xp, out_proj + lm_head preall", "triton_xp", 8, 1024, (8, 1024), (4, 2048, True), True),
    ("xp bn4 bk2048, out_proj preall", "triton_xp", 4, 2048, (8, 1024), (4, 2048, True), False),
    ("xp again", "triton_xp", 8, 1024, (8, 1024), (4, 2048, False), False),
    ("base again", "triton", 8, 1024, (8, 1024), (4, 2048, False), False),
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
    for label, mode, bn, bk, (ibn, ibk), (obn, obk, opre), lpre in VARIANTS:
        os.environ["FALCON_MAMBA_GEMV"] = mode
        I.XP_BN, I.XP_BK = bn, bk
        G.TUNED[kin] = G.GemvConfig(bn=ibn, bk=ibk, i4x2=4)
        G.TUNED[kout] = G.GemvConfig(bn=obn, bk=obk, i4x2=4, preall=opre)
        G.TUNED[klm] = G.GemvConfig(bn=8, bk=1024, i4x2=4, preall=lpre)
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
