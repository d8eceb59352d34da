"""Time to first token over a 10-turn chat, with and without the session state cache.

Each turn re-sends the whole conversation (as chat front ends do). Without the cache the server
reads the whole conversation again, so the time to first token grows with the turn; with it, the
server restores the state at the end of the previous prompt or answer and reads only what is new.
Prints a table, then one JSON line.

    PYTHONPATH=. python3 benchmarks/bench_prefix_cache.py                 # random "small" model
    PYTHONPATH=. python3 benchmarks/bench_prefix_cache.py --model DIR --out result.json

Both servers are `falcon-mamba serve` subprocesses on 127.0.0.1, run one after the other; the only
difference is --prefix-cache-memory (1GiB vs 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_test import SHAPES, WORDS, ServerProcess, env_info, random_model_dir  # noqa: E402


def chat_turns(url: str, model: str, turns: int, words: int, max_tokens: int, seed: int) -> list[dict]:
    import httpx

    rng = random.Random(seed)
    msgs = [{"role": "system", "content": "You are a helpful assistant. " * 4}]
    out = []
    with httpx.Client(timeout=600) as client:
        for _ in range(turns):
            msgs.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))})
            body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft, text, usage = None, "", None
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    d = json.loads(line[6:])
                    usage = d.get("usage") or usage
                    for c in d.get("choices", []):
                        piece = c["delta"].get("content")
                        if piece:
                            ttft = ttft or time.perf_counter() - t0
                            text += piece
            msgs.append({"role": "assistant", "content": text})
            out.append({"ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="model folder")
    src.add_argument("--random", choices=sorted(SHAPES), default="small",
                     help="random model shape (default small)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--conversations", type=int, default=3, help="repeats; the median is reported")
    ap.add_argument("--words", type=int, default=60, help="words per user message")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    folder = args.model or random_model_dir(args.random, tmp.name)
    runs = {}
    servers = {}
    for name, mem in (("cache", "1GiB"), ("no_cache", "0")):
        extra = ["--prefix-cache-memory", mem] + (["--threads", str(args.threads)] if args.threads else [])
        srv = ServerProcess(folder, extra)
        servers[name] = {"command": " ".join(srv.cmd[1:]), "banner": srv.banner}
        try:
            model = os.path.basename(folder.rstrip("/"))
            chat_turns(srv.url, model, 2, 8, 4, seed=999)  # warm-up
            runs[name] = [chat_turns(srv.url, model, args.turns, args.words, args.max_tokens, seed=c)
                          for c in range(args.conversations)]
        finally:
            srv.stop()
    tmp.cleanup()
    rows = []
    for t in range(args.turns):
        row = {"turn": t + 1, "prompt_tokens": runs["cache"][0][t]["prompt_tokens"]}
        for name in runs:
            row[f"ttft_ms_{name}"] = 1e3 * statistics.median(r[t]["ttft_s"] for r in runs[name])
            row[f"cached_tokens_{name}"] = runs[name][0][t]["cached_tokens"]
        rows.append(row)
    print(f"{'turn':>4} {'prompt tok':>10} {'cached tok':>10} {'TTFT cache (ms)':>16} "
          f"{'TTFT no cache (ms)':>19}")
    for r in rows:
        print(f"{r['turn']:>4} {r['prompt_tokens']:>10} {r['cached_tokens_cache']:>10} "
              f"{r['ttft_ms_cache']:>16.1f} {r['ttft_ms_no_cache']:>19.1f}")
    last = rows[-1]
    print(f"turn {last['turn']}: {last['ttft_ms_no_cache'] / last['ttft_ms_cache']:.1f}x faster first "
          f"token with the cache")
    record = {"benchmark": "serve-prefix-cache", "note": args.note,
              "model": args.model or f"random {args.random}", "config": SHAPES.get(args.random),
              "servers": servers, "turns": args.turns, "conversations": args.conversations,
              "words_per_message": args.words, "max_tokens": args.max_tokens, "rows": rows,
              "env": env_info()}
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
