"""Quality of weight-only quantization: int8 and int4 (group 128/64/32) against the dense model.

    PYTHONPATH=. python3 benchmarks/quant_quality.py [--model DIR] [--json OUT.json] [--append OUT.jsonl]
        [--skip-7b] [--skip-perplexity] [--dt-proj quantized|dense|both]

1. A random 7B-shaped layer (CPU is enough): one Falcon Mamba block with the 7B's shapes
   (hidden 4096, inner 8192, dt rank 256, state 16) and its 65,024 x 4096 embedding and lm_head,
   HF-style random initialisation, 64 random tokens. Reported per variant: relative L2 error of the
   logits, the block's output error, top-1 agreement and the mean KL(dense || quantized).
2. Perplexity delta on a trained model (default: the embedded default model, when installed):
   perplexity and bits per byte of held-out text, the last 2% of each file of the offline corpus
   (the split the corpus README sets aside; capped at 64 KiB per file), dense vs each variant.
Each variant quantizes in_proj, x_proj, out_proj and lm_head (when untied), plus dt_proj unless
--dt-proj dense; --dt-proj both measures each variant both ways (rows carry "dt_proj"). The module
list is chosen here, not taken from quantize_model's default, so a record says what it measured.
Prints a table per part, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import falcon_mamba as fm  # noqa: E402
from falcon_mamba.eval.perplexity import perplexity_file  # noqa: E402
from falcon_mamba.quant import quantizable_modules, quantize_model  # noqa: E402

VARIANTS = [("int8", 8, None), ("int4-g128", 4, 128), ("int4-g64", 4, 64), ("int4-g32", 4, 32)]
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
TAIL_BYTES = 64 * 1024
DT_CHOICES = {"quantized": ("quantized",), "dense": ("dense",), "both": ("dense", "quantized")}


def _variants(dt_proj: str):
    """(name, bits, group, dt_proj) for every variant and dt_proj choice."""
    return [(name, bits, group, dt) for name, bits, group in VARIANTS for dt in DT_CHOICES[dt_proj]]


def _quantize(dense, bits, group, dt):
    model = copy.deepcopy(dense)
    modules = quantizable_modules(model, include_dt_proj=dt == "quantized")
    return quantize_model(model, bits, group, modules=modules)


@torch.no_grad()
def layer_7b(dt_proj: str, tokens: int = 64) -> list[dict]:
    torch.manual_seed(0)
    cfg = fm.get_preset("falcon-mamba-7b").replace(num_hidden_layers=1)
    dense = fm.FalconMamba(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    block_out = {}

    def hook(_m, _i, out):
        block_out["y"] = out[0].detach().clone()

    def run(model):
        h = model.backbone.layers[0].mixer.register_forward_hook(hook)
        logits, _ = model(ids)
        h.remove()
        return logits[0], block_out["y"]

    ref_logits, ref_y = run(dense)
    rows = []
    for name, bits, group, dt in _variants(dt_proj):
        q = _quantize(dense, bits, group, dt)
        logits, y = run(q)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                      reduction="batchmean").item()
        rows.append({"variant": name, "dt_proj": dt,
                     "logits_rel_l2": ((logits - ref_logits).norm() / ref_logits.norm()).item(),
                     "logits_max_abs": (logits - ref_logits).abs().max().item(),
                     "logits_std": ref_logits.std().item(),
                     "block_out_rel_l2": ((y - ref_y).norm() / ref_y.norm()).item(),
                     "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                     "kl_dense_quant": kl})
        del q
    return rows


def heldout_file(out_dir: Path) -> Path:
    """The last 2% (at most 64 KiB) of each corpus file, cut at line breaks, in one file."""
    parts = []
    for f in sorted(CORPUS.glob("*.txt")):
        data = f.read_bytes()
        tail = data[-min(len(data) // 50, TAIL_BYTES):]
        tail = tail[tail.index(b"\n") + 1:]
        parts.append(tail.decode("utf-8", errors="strict"))
    path = out_dir / "heldout.txt"
    path.write_text("".join(parts), encoding="utf-8")
    return path


def perplexity_delta(model_dir: str, text: Path, dt_proj: str) -> list[dict]:
    tok = fm.load_tokenizer(model_dir)
    dense = fm.load_model(model_dir, dtype=torch.float32)
    base = perplexity_file(dense, tok, text, chunk_size=512)
    rows = [{"variant": "dense fp32", "dt_proj": "dense", "tokens": base.tokens,
             "perplexity": base.perplexity, "bits_per_byte": base.bits_per_byte, "ppl_delta": 0.0,
             "ppl_delta_pct": 0.0}]
    for name, bits, group, dt in _variants(dt_proj):
        q = _quantize(dense, bits, group, dt)
        r = perplexity_file(q, tok, text, chunk_size=512)
        rows.append({"variant": name, "dt_proj": dt, "tokens": r.tokens, "perplexity": r.perplexity,
                     "bits_per_byte": r.bits_per_byte, "ppl_delta": r.perplexity - base.perplexity,
                     "ppl_delta_pct": 100 * (r.perplexity / base.perplexity - 1)})
    return rows


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="trained model folder (default: the embedded default model)")
    ap.add_argument("--skip-7b", action="store_true", help="skip the random 7B-shaped layer")
    ap.add_argument("--skip-perplexity", action="store_true", help="skip the perplexity part")
    ap.add_argument("--dt-proj", choices=sorted(DT_CHOICES), default="both",
                    help="quantize dt_proj too (quantized), keep it dense, or measure both (default)")
    ap.add_argument("--json", help="also write the JSON record to this file")
    ap.add_argument("--append", help="also append the JSON record as one line to this file")
    args = ap.parse_args()
    record = {"bench": "quant_quality", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "commit": _commit(), "dt_proj": args.dt_proj}
    if not args.skip_7b:
        rows = layer_7b(args.dt_proj)
        record["layer_7b"] = rows
        print("random 7B-shaped block (hidden 4096, inner 8192, vocab 65024), 64 tokens, fp32 activations")
        print(f"{'variant':<10} {'dt_proj':<9} {'logits rel L2':>13} {'max |diff|':>10} {'block rel L2':>12} "
              f"{'top-1 agree':>11} {'KL':>9}")
        for r in rows:
            print(f"{r['variant']:<10} {r['dt_proj']:<9} {r['logits_rel_l2']:>13.4f} "
                  f"{r['logits_max_abs']:>10.4f} {r['block_out_rel_l2']:>12.4f} "
                  f"{r['top1_agreement']:>11.3f} {r['kl_dense_quant']:>9.5f}")
    model_dir = args.model
    if model_dir is None and not args.skip_perplexity:
        from falcon_mamba import default_model

        model_dir = str(default_model.path()) if default_model.available() else None
        if model_dir is None:
            print("no trained model (the embedded default model is not installed; pass --model): "
                  "perplexity part skipped")
    if model_dir is not None and not args.skip_perplexity:
        with tempfile.TemporaryDirectory() as tmp:
            text = heldout_file(Path(tmp))
            rows = perplexity_delta(model_dir, text, args.dt_proj)
        record["perplexity"] = {"model": model_dir, "text": "last 2% (<= 64 KiB) of each corpus file",
                                "rows": rows}
        print(f"\nperplexity on held-out text, model {model_dir}")
        print(f"{'variant':<11} {'dt_proj':<9} {'tokens':>8} {'perplexity':>11} {'bits/byte':>10} "
              f"{'delta':>8} {'delta %':>8}")
        for r in rows:
            print(f"{r['variant']:<11} {r['dt_proj']:<9} {r['tokens']:>8,} {r['perplexity']:>11.3f} "
                  f"{r['bits_per_byte']:>10.4f} {r['ppl_delta']:>8.3f} {r['ppl_delta_pct']:>7.2f}%")
    line = json.dumps(record)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
