"""`falcon-mamba bench`: speed and memory on this GPU, ours against transformers, with plots.

Parts (any of them; default decode prefill):
  decode      the kernel loop (graphed greedy steps back to back) at each --decode-batches;
              fm.generate() greedy and sampled at the same batches (needs --tokenizer); and
              transformers' generate
  prefill     parallel prefill at --prefill-lengths (ours, Mistral-7B-shaped transformer) and
              transformers' FalconMamba at --hf-prefill-length (its prefill is a Python loop)
  chunked     a --long-prompt prompt (1M) prefilled in --chunk chunks, under the memory cap
  memcap      the longest prompt under --cap-gb, parallel and chunked, ours and the transformer
  generation  decode speed and peak memory at positions up to 130k, ours and the transformer
  all         everything
Writes bench.json (GPU, commit, versions, every figure and its fraction of the ceiling), bench.txt
(the summary table) and PNG plots to --out. Random weights, built on the device.
"""

from __future__ import annotations

import time
from pathlib import Path

NAME = "bench"
HELP = "benchmark decode/prefill speed and memory against transformers; writes JSON and PNG plots"
PARTS = ("decode", "prefill", "chunked", "memcap", "generation")


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.replace("_", "").split(",") if v.strip()]


def add_arguments(p) -> None:
    p.add_argument("parts", nargs="*", default=["decode", "prefill"], choices=PARTS + ("all",),
                   help="what to measure (default: decode prefill)")
    p.add_argument("--preset", default="falcon-mamba-7b", help="model shapes (default falcon-mamba-7b)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--backend", default=None, help="op backend override (triton, torch, reference)")
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers models")
    p.add_argument("--small-baseline", action="store_true",
                   help="tiny transformer baseline (CPU smoke runs)")
    p.add_argument("--decode-batches", type=_ints, default=[1, 64])
    p.add_argument("--decode-tokens", type=int, default=512)
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a tokenizer of the preset's vocabulary (e.g. the Falcon tokenizer's folder): "
                        "adds fm.generate() rows to the decode part")
    p.add_argument("--generate-tokens", type=int, default=256, help="tokens per row of the generate() rows")
    p.add_argument("--hf-decode-tokens", type=int, default=8)
    p.add_argument("--prefill-lengths", type=_ints, default=[2048, 16384])
    p.add_argument("--hf-prefill-length", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--long-prompt", type=int, default=1_000_000)
    p.add_argument("--cap-gb", type=float, default=24.0)
    p.add_argument("--memcap-limit", type=int, default=1 << 19, help="longest parallel prompt tried")
    p.add_argument("--gen-positions", type=_ints, default=[0, 16384, 32768, 65536, 98304, 129000])
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens timed at inner positions")
    p.add_argument("--gen-edge-tokens", type=int, default=1000, help="tokens at the first/last position")
    p.add_argument("--tf-gen-tokens", type=int, default=16)
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which the long parts stop adding points")


def run(args) -> int:
    import torch

    from falcon_mamba import ops
    from falcon_mamba.cli import _bench_paper as paper
    from falcon_mamba.cli import _bench_speed as speed
    from falcon_mamba.cli._bench_util import (
        build_hf_falcon_mamba,
        build_mistral,
        build_ours,
        env_record,
        free_memory,
        measure_ceilings,
        nbytes_params,
        section,
        write_json_atomic,
    )
    from falcon_mamba.config import get_preset
    from falcon_mamba.dtypes import check_device_dtype, parse_dtype
    from falcon_mamba.errors import UserError

    parts = set(PARTS) if "all" in args.parts else set(args.parts)
    device = check_device_dtype(args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                parse_dtype(args.dtype))
    dtype = parse_dtype(args.dtype)
    if args.backend:
        ops.set_backend(args.backend)
    config = get_preset(args.preset)
    out_dir = Path(args.out)
    t_start = time.perf_counter()
    deadline = t_start + (args.deadline if args.deadline else 1e12)
    log = lambda s: print(s, flush=True)  # noqa: E731
    res: dict = {"env": env_record(device), "args": {k: v for k, v in vars(args).items()
                                                      if not k.startswith("_")}}
    res["env"]["op_backend"] = ops.backend_name(device)
    res["env"]["preset"] = args.preset
    res["env"]["dtype"] = str(dtype)
    section(res, "ceilings", lambda: measure_ceilings(device), log)
    ceil = res["ceilings"] if "error" not in res["ceilings"] else {}
    copy_bw, mm_rate = ceil.get("copy_bytes_per_s"), ceil.get("matmul_flop_per_s")
    cap = int(args.cap_gb * 1e9) if device.type == "cuda" else None
    baseline = not args.no_baseline
    raw: dict = {}

    # 1) our model: every part that needs it, then free it
    model = build_ours(config, dtype, device)
    res["env"]["weights_gib"] = nbytes_params(model) / 2 ** 30
    if "decode" in parts:
        def dec():
            rows = [speed.decode_ours(model, b, args.decode_tokens, device) for b in args.decode_batches]
            if device.type == "cuda":  # the same fused step without graphs, for the notes
                rows.append(speed.decode_ours(model, 1, min(32, args.decode_tokens), device, graphs=False))
            return rows
        section(raw, "decode_ours", dec, log)
        if args.tokenizer:
            from falcon_mamba.tokenizer import load_tokenizer

            tok = load_tokenizer(args.tokenizer)
            section(raw, "generate_ours", lambda: [
                speed.generate_ours(model, tok, b, args.generate_tokens, device, sampled)
                for b in args.decode_batches for sampled in (False, True)], log)
    if "prefill" in parts:
        section(raw, "prefill_ours", lambda: [speed.prefill_ours(model, n, device)
                                              for n in args.prefill_lengths], log)
    if "chunked" in parts:
        def chunk():
            from falcon_mamba.cli._bench_util import memory_cap

            with memory_cap(device, cap):
                r = speed.chunked_prefill(model, args.long_prompt, args.chunk, device)
            r["cap_gb"] = args.cap_gb if cap else None
            return r
        section(res, "chunked", chunk, log)
    if "memcap" in parts:
        section(raw, "memcap_ours", lambda: paper.memcap(
            {"Falcon Mamba parallel": paper.ours_parallel(model, device)}, device, cap,
            {"Falcon Mamba parallel": 16384}, {"Falcon Mamba parallel": args.memcap_limit}, log)
            if cap else {}, log)
    if "generation" in parts:
        n_tok = [args.gen_edge_tokens if i in (0, len(args.gen_positions) - 1) else args.gen_tokens
                 for i in range(len(args.gen_positions))]
        section(raw, "gen_ours", lambda: paper.curve_ours(model, device, args.gen_positions, n_tok,
                                                          args.chunk, deadline, log), log)
    model = None  # free it before the next model is built
    free_memory(device)

    # 2) transformers' FalconMamba: decode and prefill baselines
    if baseline and parts & {"decode", "prefill"}:
        try:
            hf = build_hf_falcon_mamba(config, dtype, device)
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            raw["hf_build_error"] = f"{type(e).__name__}: {e}"
            hf = None
        if hf is not None:
            if "decode" in parts:
                section(raw, "decode_hf", lambda: [speed.decode_hf(hf, b, args.hf_decode_tokens,
                                                                   config.vocab_size, device)
                                                   for b in args.decode_batches], log)
            if "prefill" in parts:
                section(raw, "prefill_hf", lambda: [speed.prefill_hf(hf, args.hf_prefill_length,
                                                                     config.vocab_size, device)], log)
            hf = None
            free_memory(device)

    # 3) the Mistral-7B-shaped transformer: prefill, memcap, generation
    if baseline and parts & {"prefill", "memcap", "generation"}:
        try:
            tf = build_mistral(config.vocab_size, dtype, device, small=args.small_baseline)
        except Exception as e:  # noqa: BLE001
            raw["tf_build_error"] = f"{type(e).__name__}: {e}"
            tf = None
        if tf is not None:
            V = config.vocab_size
            if "prefill" in parts:
                section(raw, "prefill_tf", lambda: [speed.prefill_hf(tf, n, V, device, reps=3)
                                                    for n in args.prefill_lengths], log)
            if "memcap" in parts and cap:
                section(raw, "memcap_tf", lambda: paper.memcap(
                    {"Transformer parallel": paper.hf_parallel(tf, V, device),
                     "Transformer chunked": paper.hf_chunked(tf, V, device, args.chunk)},
                    device, cap, {"Transformer parallel": 8192, "Transformer chunked": 16384},
                    {"Transformer parallel": args.memcap_limit, "Transformer chunked": args.memcap_limit},
                    log), log)
            if "generation" in parts:
                section(raw, "gen_tf", lambda: paper.curve_hf(tf, V, device, args.gen_positions,
                                                              args.tf_gen_tokens, args.chunk,
                                                              deadline, log), log)
            tf = None
            free_memory(device)

    _assemble(res, raw, config, args, copy_bw, mm_rate, speed)
    res["raw"] = raw
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from falcon_mamba.cli._bench_plot import plot_all

        res["plots"] = plot_all(res, out_dir)
    except ImportError as e:
        res["plots"] = f"not drawn: {e}"
    write_json_atomic(out_dir / "bench.json", res)
    text = _summary(res)
    (out_dir / "bench.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    if any(isinstance(v, dict) and "error" in v for v in list(raw.values()) + [res.get("chunked")]):
        raise UserError(f"some benchmark parts failed; see {out_dir / 'bench.json'}")
    return 0


def _frac(v, c):
    return None if not v or not c else v / c


def _assemble(res, raw, config, args, copy_bw, mm_rate, speed) -> None:
    """Tables with ceilings, the memcap and generation figures, and the issue's targets."""
    ok = lambda k: isinstance(raw.get(k), list)  # noqa: E731
    rows = []
    for key, system in (("decode_ours", "ours"), ("decode_hf", "transformers FalconMamba")):
        for r in raw.get(key) if ok(key) else []:
            c = speed.decode_ceiling(config, r["batch"], copy_bw)
            name = system if r.get("graphs", True) or system != "ours" else "ours (no graphs)"
            rows.append({"system": name, "batch": r["batch"], "tok_per_s": r["tok_per_s"],
                         "ceiling_tok_per_s": c, "fraction_of_ceiling": _frac(r["tok_per_s"], c)})
    for r in raw.get("generate_ours") if ok("generate_ours") else []:
        c = speed.decode_ceiling(config, r["batch"], copy_bw)
        v = r["decode_tok_per_s"]
        rows.append({"system": f"fm.generate {r['sampling']}", "batch": r["batch"], "tok_per_s": v,
                     "wall_tok_per_s": r["wall_tok_per_s"], "ceiling_tok_per_s": c,
                     "fraction_of_ceiling": _frac(v, c)})
    if rows:
        res["decode"] = {"rows": rows, "copy_bytes_per_s": copy_bw,
                         "bytes_per_step_b1": speed.decode_bytes_per_step(config, 1)}
    prow = []
    pc = speed.prefill_ceiling(config, mm_rate)
    for key, system in (("prefill_ours", "ours"), ("prefill_hf", "transformers FalconMamba"),
                        ("prefill_tf", "transformer (Mistral-7B shape)")):
        for r in raw.get(key) if ok(key) else []:
            own = system != "transformer (Mistral-7B shape)"  # the ceiling is Falcon Mamba's
            prow.append({"system": system, **r,
                         "fraction_of_ceiling": _frac(r["tok_per_s"], pc) if own else None})
    if prow:
        res["prefill"] = {"rows": prow, "ceiling_tok_per_s": pc, "matmul_flop_per_s": mm_rate,
                          "flops_per_token": speed.prefill_flops_per_token(config)}
    mc = {}
    for key in ("memcap_ours", "memcap_tf"):
        if isinstance(raw.get(key), dict) and "error" not in raw[key]:
            mc.update(raw[key])
    ch = res.get("chunked")
    if isinstance(ch, dict) and "error" not in ch and ch.get("cap_gb"):
        mc["Falcon Mamba chunked"] = {"max_tokens": ch["length"], "first_failure": None,
                                      "peak_extra_gib": ch["extra_gib"]}
    if mc:
        order = ["Falcon Mamba parallel", "Falcon Mamba chunked", "Transformer parallel",
                 "Transformer chunked"]
        res["memcap"] = {"cap_gb": args.cap_gb, "results": {k: mc[k] for k in order if k in mc}}
    if "gen_ours" in raw or "gen_tf" in raw:
        res["generation"] = {"ours": raw.get("gen_ours") if ok("gen_ours") else None,
                             "transformer": raw.get("gen_tf") if ok("gen_tf") else None}
    res["targets"] = _targets(res, raw)


def _targets(res, raw) -> dict:
    t = {}
    for r in (res.get("decode") or {}).get("rows", []):
        if r["system"] == "ours" and r["batch"] == 1:
            t["decode_b1_tok_per_s>=180"] = {"value": r["tok_per_s"], "met": r["tok_per_s"] >= 180}
        if r["system"] == "ours" and r["batch"] == 64:
            t["decode_b64_tok_per_s>=6000"] = {"value": r["tok_per_s"], "met": r["tok_per_s"] >= 6000}
    gen = {(r["batch"], r["system"]): r["tok_per_s"] for r in (res.get("decode") or {}).get("rows", [])}
    g1, s1 = gen.get((1, "fm.generate greedy")), gen.get((1, "fm.generate temperature 0.8, top_p 0.95"))
    if g1 and s1:
        t["generate_b1_sampled>=0.95x_greedy"] = {"value": s1 / g1, "met": s1 >= 0.95 * g1}
    k64, s64 = gen.get((64, "ours")), gen.get((64, "fm.generate temperature 0.8, top_p 0.95"))
    if k64 and s64:
        t["generate_b64_sampled>=0.85x_kernel_loop"] = {"value": s64 / k64, "met": s64 >= 0.85 * k64}
    par = None
    for r in (res.get("prefill") or {}).get("rows", []):
        if r["system"] == "ours" and r["length"] == 16384:
            par = r
            t["prefill_16k_seconds<=0.6"] = {"value": r["seconds"], "met": r["seconds"] <= 0.6}
    ch = res.get("chunked")
    if isinstance(ch, dict) and "error" not in ch:
        extra_gb = ch["extra_gib"] * 2 ** 30 / 1e9
        t["chunked_1M_extra_gb<=2"] = {"value": extra_gb, "met": extra_gb <= 2.0}
        if par:
            f = ch["tok_per_s"] / par["tok_per_s"]
            t["chunked_1M_throughput>=0.7x_parallel"] = {"value": f, "met": f >= 0.7}
    gen = [p for p in (raw.get("gen_ours") or []) if isinstance(p, dict) and "tok_per_s" in p] \
        if isinstance(raw.get("gen_ours"), list) else []
    if len(gen) >= 2 and gen[0]["peak_gib"] > 0:
        first, last = gen[0], gen[-1]
        growth = last["peak_gib"] / first["peak_gib"] - 1
        speed_ratio = last["tok_per_s"] / first["tok_per_s"]
        t["generation_peak_memory_growth<1%"] = {"value": growth, "met": growth < 0.01,
                                                 "positions": [first["position"], last["position"]]}
        t["generation_last_vs_first_speed>=0.95"] = {"value": speed_ratio, "met": speed_ratio >= 0.95}
    return t


def _summary(res) -> str:
    env = res["env"]
    lines = [f"falcon-mamba bench: {env.get('gpu')}, commit {(env.get('commit') or '?')[:10]}"
             f"{'+dirty' if env.get('dirty') else ''}, torch {env.get('torch')}, triton "
             f"{env.get('triton')}, transformers {env.get('transformers')}, backend {env.get('op_backend')}"]
    c = res.get("ceilings") or {}
    if c.get("copy_bytes_per_s"):
        lines.append(f"measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                     f"{c['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    for r in (res.get("decode") or {}).get("rows", []):
        f = r.get("fraction_of_ceiling")
        lines.append(f"decode  {r['system']:<40} B={r['batch']:<4} {r['tok_per_s']:>10.1f} tok/s"
                     + (f"  ({f:.0%} of {r['ceiling_tok_per_s']:.0f})" if f else "")
                     + (f"  wall {r['wall_tok_per_s']:.1f}" if r.get("wall_tok_per_s") else ""))
    for r in (res.get("prefill") or {}).get("rows", []):
        f = r.get("fraction_of_ceiling")
        lines.append(f"prefill {r['system']:<32} L={r['length']:<7} {r['seconds']:>8.3f} s "
                     f"{r['tok_per_s']:>9.0f} tok/s  +{r['extra_gib']:.2f} GiB"
                     + (f"  ({f:.0%} of ceiling)" if f else ""))
    ch = res.get("chunked")
    if isinstance(ch, dict) and "error" not in ch:
        lines.append(f"chunked prefill L={ch['length']:,} chunk {ch['chunk']}: {ch['seconds']:.1f} s, "
                     f"{ch['tok_per_s']:.0f} tok/s, +{ch['extra_gib']:.2f} GiB over the weights")
    for name, r in ((res.get("memcap") or {}).get("results") or {}).items():
        lines.append(f"memcap {res['memcap']['cap_gb']:.0f} GB  {name:<24} "
                     f"{r.get('max_tokens', 0):>10,} tokens"
                     + ("  (no failure up to this length)" if r.get("first_failure") is None else ""))
    for key in ("ours", "transformer"):
        pts = (res.get("generation") or {}).get(key) or []
        for p in pts:
            if "tok_per_s" in p:
                lines.append(f"generation {key:<12} pos {p['position']:>8,}: {p['tok_per_s']:>8.1f} tok/s, "
                             f"peak {p['peak_gib']:.2f} GiB")
    for name, t in (res.get("targets") or {}).items():
        v = t["value"]
        lines.append(f"target {name:<42} {v:>12.4g}  {'MET' if t['met'] else 'NOT MET'}")
    lines.append(f"total {res.get('total_seconds')} s")
    return "\n".join(lines)
