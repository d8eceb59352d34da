"""What a bf16 SSM state (serve --state-dtype bfloat16) costs in quality: the embedded default
model reads held-out text token by token (model.step, the decode path's math) from an fp32 state
and from a bf16 state rounded after every step, as the state pool keeps it; prints bits per byte
of both, how often their greedy tokens agree, and the largest logit difference.

    PYTHONPATH=. python3 benchmarks/state_dtype_quality.py [--tokens 4096] [--out F.json]

The text: the last --tokens tokens of each ../shared/corpus file (inside the last 2% of each that
the default model's training held out: default_model/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from falcon_mamba import default_model, load_model  # noqa: E402
from falcon_mamba.state import State  # noqa: E402
from falcon_mamba.tokenizer import load_tokenizer  # noqa: E402


@torch.inference_mode()
def read(model, ids: list[int], ssm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced steps from a zero state; (log-prob of each next token (T-1,), argmax (T-1,))."""
    st = State.zeros(model.config, 1, model.dtype, model.device, ssm_dtype)
    lp, top = [], []
    for t in range(len(ids) - 1):
        logits = model.step(torch.tensor([ids[t]]), st)[0].float()
        lp.append(logits.log_softmax(-1)[ids[t + 1]])
        top.append(logits.argmax())
    return torch.stack(lp), torch.stack(top)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per file read")
    ap.add_argument("--corpus",
                    default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus"))
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model = load_model(default_model.path(), dtype=torch.float32, device="cpu").eval()
    tok = load_tokenizer(default_model.path())
    res = {"model": "embedded default model", "tokens_per_file": args.tokens, "files": {}}
    totals = {torch.float32: [0.0, 0], torch.bfloat16: [0.0, 0]}
    for name in sorted(os.listdir(args.corpus)):
        if not name.endswith(".txt"):
            continue
        with open(os.path.join(args.corpus, name), encoding="utf-8") as f:
            text = f.read()[-args.tokens * 8:]
        ids = tok.encode(text)[-args.tokens:]
        nbytes = len(tok.decode(ids[1:]).encode("utf-8"))
        t0 = time.perf_counter()
        lp32, top32 = read(model, ids, torch.float32)
        lp16, top16 = read(model, ids, torch.bfloat16)
        row = {"tokens": len(ids), "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 1),
               "bits_per_byte_fp32": -lp32.sum().item() / math.log(2) / nbytes,
               "bits_per_byte_bf16": -lp16.sum().item() / math.log(2) / nbytes,
               "greedy_agreement": (top32 == top16).float().mean().item(),
               "max_abs_logprob_diff": (lp32 - lp16).abs().max().item()}
        res["files"][name] = row
        for dt, lp in ((torch.float32, lp32), (torch.bfloat16, lp16)):
            totals[dt][0] += -lp.sum().item() / math.log(2)
            totals[dt][1] += nbytes
        print(name, json.dumps(row), flush=True)
    res["bits_per_byte_fp32"] = totals[torch.float32][0] / totals[torch.float32][1]
    res["bits_per_byte_bf16"] = totals[torch.bfloat16][0] / totals[torch.bfloat16][1]
    res["relative_change"] = res["bits_per_byte_bf16"] / res["bits_per_byte_fp32"] - 1
    print(json.dumps({k: v for k, v in res.items() if k != "files"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
