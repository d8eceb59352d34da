"""Training step on the CPU: transformers' FalconMambaForCausalLM (its torch fallback) vs ours
(op backend "torch", the chunked scan), same weights, fp32, forward + loss + backward.

    PYTHONPATH=. python3 benchmarks/bench_cpu_scan.py [--hf-repeats 3] [--repeats 5] [--variants]

The model: an ~18M-parameter Falcon Mamba (hidden 384, 6 layers, inner 768, state 16, conv 4,
dt rank 24, vocab 16384, untied lm_head), random weights, batch 4 x 256 tokens, next-token
cross-entropy. Both models get the same state dict; the script checks that their logits and one
parameter's gradient agree before it reports times (so both do the same work). Times are medians
of the repeats, after a warm-up on a short batch.

--variants adds a scan-only table (the same B, L, D, N; forward + backward through autograd):
the chunked backend at several chunk lengths and tile sizes, a masked segment-sum chunked scan
(the Mamba-2 style formulation, defined here) at several chunk lengths, and the reference.

transformers' backward is dominated by memory traffic: each step of its time loop slices a
(B, D, L, N) tensor, whose gradient is a fresh zero-filled (B, D, L, N) tensor, so a step
touches ~150 GB and, with glibc's default malloc, takes ~38 million page faults. Its time
therefore depends a lot on the allocator; the record keeps the page-fault counts and any MALLOC_*
settings. To see transformers at its fastest, keep freed memory in the process:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 PYTHONPATH=. \
        python3 benchmarks/bench_cpu_scan.py --out benchmarks/results/cpu_scan-DATE-malloc-retain.json

Prints a table, writes benchmarks/results/cpu_scan-<date>.json (machine, versions, commit, load),
and prints the same record as one JSON line last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import falcon_mamba as fm  # noqa: E402
from falcon_mamba import ops  # noqa: E402
from falcon_mamba.ops import chunked, reference  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = fm.ModelConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=768, vocab_size=16384,
                        state_size=16, conv_kernel=4, time_step_rank=24)
BATCH, LENGTH = 4, 256


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rec = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        rec["transformers"] = transformers.__version__
    except ImportError:
        rec["transformers"] = None
    try:
        root = os.path.dirname(HERE)
        rec["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=root, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "falcon_mamba/ops"],
                               capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()
        rec["ops_tree_dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001 - the record says so
        rec["commit"] = None
    return rec


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def build_models():
    """Ours and transformers', with the same random weights."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    torch.manual_seed(0)
    ours = fm.FalconMamba(CONFIG).float()
    hf = FalconMambaForCausalLM(FalconMambaConfig(**CONFIG.to_hf_dict())).float()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    # Only the weightless B/C/dt norms' dummy ones-buffers may be missing (non-persistent).
    assert not unexpected and all("layernorm" in k or "rms" in k for k in missing), (missing, unexpected)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad) - sum(
        b.numel() for n, b in hf.named_parameters() if "layernorm" in n)
    assert n_ours == CONFIG.num_parameters == n_hf, (n_ours, CONFIG.num_parameters, n_hf)
    return ours, hf


def hf_logits(hf, ids):
    return hf(input_ids=ids, use_cache=False).logits.float()


def ours_logits(model, ids):
    return model(ids)[0]


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def train_step(logits_fn, model, ids):
    """(forward + loss seconds, backward seconds); gradients accumulate in model."""
    t0 = time.perf_counter()
    logits = logits_fn(model, ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_model(name, logits_fn, model, ids, repeats, log):
    model.zero_grad(set_to_none=True)
    train_step(logits_fn, model, ids[:, :17])  # warm-up on a short batch
    fwd, bwd, faults = [], [], []
    for r in range(repeats):
        model.zero_grad(set_to_none=True)
        f0 = minor_faults()
        f, b = train_step(logits_fn, model, ids)
        faults.append(minor_faults() - f0)
        fwd.append(f)
        bwd.append(b)
        log(f"  {name} repeat {r + 1}/{repeats}: forward+loss {f:.3f} s, backward {b:.3f} s, "
            f"{faults[-1]} page faults (load {load_average()[0]})")
    tot = [f + b for f, b in zip(fwd, bwd)]
    return {"forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "total_s": statistics.median(tot), "totals_s": [round(t, 4) for t in tot],
            "minor_page_faults": statistics.median(faults)}


# ---- scan-only variants -------------------------------------------------------------------------
def segsum_scan(x, dt, A_DN, Bm, Cm, T):
    """Chunked scan in the masked segment-sum form: inside a chunk, h_t = sum_{s<=t}
    exp(cum_t - cum_s) w_s + exp(cum_t) h_in, cum = cumsum of dt*A (<= 0 differences: no
    overflow); a loop over chunks carries the state. Materialises (B, T, T, D, N) per chunk."""
    Bsz, L, D = x.shape
    N = A_DN.shape[1]
    nc = -(-L // T)
    pad = nc * T - L
    dtA = F.pad(dt[..., None] * A_DN, (0, 0, 0, 0, 0, pad)).view(Bsz, nc, T, D, N)
    w = F.pad((dt * x)[..., None] * Bm[:, :, None, :], (0, 0, 0, 0, 0, pad)).view(Bsz, nc, T, D, N)
    Cc = F.pad(Cm, (0, 0, 0, pad)).view(Bsz, nc, T, N)
    cum = dtA.cumsum(2)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None, None]
    h = x.new_zeros(Bsz, D, N)
    ys = []
    for c in range(nc):
        seg = (cum[:, c, :, None] - cum[:, c, None, :]).masked_fill(~causal, float("-inf"))
        h_all = torch.einsum("btsdn,bsdn->btdn", seg.exp(), w[:, c])
        h_all = torch.addcmul(h_all, cum[:, c].exp(), h[:, None])
        ys.append(torch.einsum("btdn,btn->btd", h_all, Cc[:, c]))
        h = h_all[:, -1]
    return torch.cat(ys, 1)[:, :L], h


def scan_variants(log, repeats=3):
    D, N = CONFIG.intermediate_size, CONFIG.state_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, LENGTH, D, generator=g)
    dt_raw = torch.randn(BATCH, LENGTH, D, generator=g) - 2.0
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(D, N).contiguous()
    Bm, Cm = torch.randn(BATCH, LENGTH, N, generator=g), torch.randn(BATCH, LENGTH, N, generator=g)

    def timed(fn):
        leaves = [t.clone().requires_grad_() for t in (x, dt_raw, A, Bm, Cm)]
        ts = []
        for _ in range(repeats + 1):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter()
            y, h = fn(*leaves)
            (y.float().square().mean() + h.square().mean()).backward()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])

    rows = []

    def add(name, fn):
        rows.append({"variant": name, "s": timed(fn)})
        log(f"  {name:36s} {rows[-1]['s'] * 1e3:9.1f} ms")

    saved = (chunked.CHUNK, dict(chunked.TILE_ELEMS))
    try:
        for T in (4, 8, 16):
            for tile in (1 << 20, 1 << 21, 1 << 22):
                chunked.CHUNK, chunked.TILE_ELEMS["cpu"] = T, tile
                add(f"two-level T={T} tile=2^{tile.bit_length() - 1}",
                    lambda x, dt, A, B, C: chunked.selective_scan(x, dt, A, B, C))
    finally:
        chunked.CHUNK, chunked.TILE_ELEMS = saved[0], saved[1]
    for T in (4, 8, 16):
        add(f"segment-sum T={T}", lambda x, dt, A, B, C, T=T: segsum_scan(x, F.softplus(dt), A, B, C, T))
    add("reference (one step at a time)", lambda x, dt, A, B, C: reference.selective_scan(x, dt, A, B, C))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps of ours (median)")
    p.add_argument("--hf-repeats", type=int, default=3, help="timed steps of transformers (median)")
    p.add_argument("--variants", action="store_true", help="also time scan-only variants")
    p.add_argument("--out", default=None, help="result file (default results/cpu_scan-<date>.json)")
    args = p.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    rec = {"bench": "cpu_scan", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(), "load_before": load_average(),
           # glibc malloc settings change how often freed memory is page-faulted back in
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
           "model": {**{k: v for k, v in CONFIG.to_hf_dict().items() if k in (
               "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "state_size",
               "conv_kernel", "time_step_rank", "tie_word_embeddings")},
               "parameters": CONFIG.num_parameters},
           "batch": [BATCH, LENGTH], "dtype": "float32",
           "ours": {"op_backend": "torch", "chunk": chunked.CHUNK, "tile_d": chunked.TILE_D.get("cpu"),
                    "tile_elems": chunked.TILE_ELEMS.get("cpu")}}
    ops.set_backend("torch")
    ours, hf = build_models()
    log(f"model: {CONFIG.num_parameters:,} parameters; batch {BATCH} x {LENGTH}; "
        f"{torch.get_num_threads()} torch threads; load {rec['load_before']}")

    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lo, lh = ours_logits(ours, ids[:2, :64]), hf_logits(hf, ids[:2, :64])
    rec["check_logits_max_abs_diff"] = (lo - lh).abs().max().item()
    assert rec["check_logits_max_abs_diff"] < 1e-3 * max(1.0, lh.abs().max().item()), rec

    rec["ours"].update(time_model("ours", ours_logits, ours, ids, args.repeats, log))
    rec["transformers"] = time_model("transformers", hf_logits, hf, ids, args.hf_repeats, log)
    # Same work: the last step's gradients agree.
    g_o = ours.backbone.layers[0].mixer.A_log.grad
    g_h = hf.backbone.layers[0].mixer.A_log.grad
    rec["check_grad_A_log_rel_diff"] = ((g_o - g_h).norm() / g_h.norm()).item()
    assert rec["check_grad_A_log_rel_diff"] < 1e-3, rec
    rec["load_after"] = load_average()
    if args.variants:  # after the model timings: its large allocations change the heap they see
        log("scan-only variants (forward + backward, median):")
        rec["scan_variants"] = scan_variants(log)
    rec["speedup_total"] = rec["transformers"]["total_s"] / rec["ours"]["total_s"]
    rec["speedup_backward"] = rec["transformers"]["backward_s"] / rec["ours"]["backward_s"]

    print(f"{'':14s} {'forward+loss':>13s} {'backward':>10s} {'total':>10s}")
    for name in ("transformers", "ours"):
        r = rec[name]
        print(f"{name:14s} {r['forward_s']:12.3f}s {r['backward_s']:9.3f}s {r['total_s']:9.3f}s")
    print(f"speed-up: {rec['speedup_total']:.1f}x total, {rec['speedup_backward']:.1f}x backward "
          f"(load before {rec['load_before']}, after {rec['load_after']})")

    out = args.out or os.path.join(HERE, "results", f"cpu_scan-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
