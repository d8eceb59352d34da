"""Host time per generated token on the serving path (issue #15), on the CPU, no GPU needed:

  detok    detokenize one token + match stop strings (Falcon tokenizer): the two-decode window
           path against the byte-table path, over English, multilingual (CJK, emoji, accents) and
           random-id text, with 0 / 1 (a chat's "\\nUser:") / 4 stop strings; us per token
  engine   the engine's `_process` (detokenize, stop rules, metrics, deltas, sinks) per row per
           step, measured inside a real engine on a tiny random model (vocab 65024, the Falcon
           tokenizer) at 64 and 256 rows; us per row
  sse      one SSE chunk of a stream: the dict + json.dumps of before against the chunk writer
  wakeups  the engine thread handing 256 streams' deltas of a step to the asyncio loop: one
           call_soon_threadsafe per stream (before) against the loop dispatcher; us per stream
           on the engine thread and wall per step, with the loop's wake-ups counted

    PYTHONPATH=. python3 benchmarks/bench_stream_host.py [--out F.json] [--root TREE]

--root measures another checkout's falcon_mamba (e.g. `git archive <commit> | tar -x -C TREE`):
the sections and rows its code lacks are left out, so one script gives the before and the after.
Prints a table per section, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = {
    "english": ("The state of a Mamba model is a fixed number of bytes, whatever the length of the "
                "context. Serving many streams at once is then a matter of keeping one row of state "
                "per stream, reading the weights once per step for every row, and handing each "
                "stream its new text as soon as the step is done.\n"),
    "multilingual": ("日本語のテキスト、😀 and 🦙 emoji, héllo wörld — “quotes” ✓; 中文字符和标点。"
                     "Ελληνικά, русский текст, 한국어 문장 🎉🎉\n"),
}
STOPS = {"0": (), "1": ("\nUser:",), "4": ("\nUser:", "</s>", "<|im_end|>", "\n###")}


def env_info(root: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import tokenizers

        info["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, cwd=root, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def best_of(fn, repeat: int) -> float:
    """The fastest of `repeat` runs of fn(), in seconds (the least disturbed by other work)."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


# ---- detok ------------------------------------------------------------------------------------
def bench_detok(tok, tokens: int, repeat: int) -> list[dict]:
    from falcon_mamba import streaming as S

    rng = random.Random(0)
    streams = {}
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        streams[name] = (ids * (tokens // len(ids) + 1))[:tokens]
    streams["random"] = [rng.randrange(12, tok.vocab_size) for _ in range(tokens)]
    context = tok.encode("User: tell me a story\n\nAssistant:")
    kinds = {"window": lambda: S.IncrementalDetokenizer(tok, context)}
    if hasattr(S, "make_detokenizer"):
        assert tok.byte_table is not None  # built once per tokenizer, outside the timing
        kinds["table"] = lambda: S.make_detokenizer(tok, context)
    rows = []
    for text, ids in streams.items():
        for stops_name, stops in STOPS.items():
            for kind, make in kinds.items():
                def run(make=make, stops=stops, ids=ids):
                    det, stop = make(), S.StopMatcher(stops)
                    out = []
                    for i in ids:
                        piece, matched = stop.push(det.push(i))
                        out.append(piece)
                        if matched:  # random ids can spell a stop string: go on as a new answer
                            stop = S.StopMatcher(stops)
                    out.append(stop.push(det.flush())[0] + stop.flush())
                    return "".join(out)

                secs = best_of(run, repeat)
                rows.append({"text": text, "stops": int(stops_name), "detokenizer": kind,
                             "us_per_token": secs / len(ids) * 1e6})
            joined = {k: None for k in kinds}  # the kinds agree on the text (checked, not timed)
            for kind, make in kinds.items():
                det = make()
                joined[kind] = "".join(det.push(i) for i in ids) + det.flush()
            assert len(set(joined.values())) == 1, "the detokenizers disagree"
    return rows


def print_detok(rows: list[dict]) -> None:
    kinds = sorted({r["detokenizer"] for r in rows}, key=["window", "table"].index)
    print(f"\n== detok + stop strings, us per token (best of runs)\n{'text':<14}{'stops':>6}"
          + "".join(f"{k:>10}" for k in kinds) + ("     speed-up" if len(kinds) == 2 else ""))
    for text in dict.fromkeys(r["text"] for r in rows):
        for stops in (0, 1, 4):
            got = {r["detokenizer"]: r["us_per_token"] for r in rows
                   if r["text"] == text and r["stops"] == stops}
            line = f"{text:<14}{stops:>6}" + "".join(f"{got[k]:>10.2f}" for k in kinds)
            if len(kinds) == 2:
                line += f"{got['window'] / got['table']:>12.1f}x"
            print(line)


# ---- engine -----------------------------------------------------------------------------------
def bench_engine(tok_dir: str, rows_list: list[int], new_tokens: int, gc_freeze: bool) -> list[dict]:
    """`_process` timed inside a running engine: per row per step, the engine thread's host work
    for the tokens of a step (the model's step is not in it). gc_freeze: gc.freeze() once the
    model and tokenizer are built, as `falcon-mamba serve` does."""
    import gc

    import torch

    from falcon_mamba.config import ModelConfig
    from falcon_mamba.engine.engine import Engine, EngineConfig
    from falcon_mamba.model import FalconMamba
    from falcon_mamba.sampling import SamplingParams
    from falcon_mamba.tokenizer import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = FalconMamba(ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                    vocab_size=65024)).eval()
    tok = load_tokenizer(tok_dir)
    getattr(tok, "byte_table", None)  # the table (where this code has one) built before any freeze
    if gc_freeze:
        gc.freeze()
    out = []
    for rows in rows_list:
        for stops_name in ("0", "1"):
            eng = Engine(model, tok, EngineConfig(num_slots=rows, max_waiting=rows, prefill_chunk=64))
            steps: list[tuple[float, int]] = []  # (seconds, rows) per _process call
            inner = eng._process

            def timed(pend, inner=inner, steps=steps):
                t0 = time.perf_counter()
                inner(pend)
                steps.append((time.perf_counter() - t0, len(pend.keys)))

            eng._process = timed
            rng = random.Random(rows)
            got: list = []
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, ignore_eos=True,
                                    stop=STOPS[stops_name], seed=1)
            reqs = []
            words = ("state", "river", "engine", "light")
            for i in range(rows):
                prompt = tok.encode(" ".join(rng.choice(words) for _ in range(20)))
                # about free: the server's own sinks are measured under `wakeups`
                reqs.append(eng.submit(prompt, params, sink=lambda ds, i=i, got=got: got.append((i, ds))))
            with torch.inference_mode():
                eng.run_until(lambda reqs=reqs: all(r.finished for r in reqs))
            # The answers themselves, so that a before / after pair shows they did not change.
            answers = {}
            for i, deltas in got:
                a = answers.setdefault(i, ["", [], None])
                for d in deltas:
                    a[0] += d.text
                    a[1] += d.token_ids
                    a[2] = d.finish_reason or a[2]
            digest = hashlib.sha1(json.dumps(sorted(answers.items())).encode()).hexdigest()[:12]
            full = sorted(secs / n for secs, n in steps if n == rows)  # the steps of a full batch
            longest = max(secs for secs, _ in steps)  # a full garbage collection lands in one
            total_s, total_rows = sum(x for x, _ in steps), sum(n for _, n in steps)
            out.append({"rows": rows, "stops": int(stops_name), "row_steps": total_rows,
                        "tokens": sum(len(a[1]) for a in answers.values()), "answers_sha1": digest,
                        "us_per_row_mean": total_s / max(1, total_rows) * 1e6,
                        "us_per_row_median_full_steps": full[len(full) // 2] * 1e6 if full else None,
                        "ms_per_step_at_rows": (full[len(full) // 2] if full else 0) * rows * 1e3,
                        "longest_step_ms": longest * 1e3})
    return out


def print_engine(rows: list[dict]) -> None:
    print("\n== engine _process: host time per row per step (median over the full steps; mean)\n"
          f"{'rows':>6}{'stops':>7}{'row-steps':>11}{'us/row':>9}{'mean':>9}{'ms/step':>9}{'longest':>9}"
          "  answers")
    for r in rows:
        print(f"{r['rows']:>6}{r['stops']:>7}{r['row_steps']:>11}{r['us_per_row_median_full_steps']:>9.1f}"
              f"{r['us_per_row_mean']:>9.1f}{r['ms_per_step_at_rows']:>9.2f}{r['longest_step_ms']:>9.1f}"
              f"  {r['answers_sha1']}")


# ---- sse --------------------------------------------------------------------------------------
def _old_chunk(rid, obj, created, model, choices, include_usage, usage=None) -> str:
    d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        d["usage"] = usage
    return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"


def bench_sse(n: int, repeat: int) -> list[dict]:
    try:
        from falcon_mamba.server.sse import ChunkWriter
    except ImportError:
        ChunkWriter = None
    rid, created, model = "cmpl-0123456789abcdef01234567", 1764633600, "falcon-mamba-7b"
    texts = [" the", " river", "’s", " 日本", "\n", " \"quoted\"", " state", "."] * (n // 8)
    rows = []
    for chat in (False, True):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def old(chat=chat, obj=obj):
            for t in texts:
                c = ({"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None} if chat
                     else {"index": 0, "text": t, "logprobs": None, "finish_reason": None})
                _old_chunk(rid, obj, created, model, [c], True)

        row = {"route": "chat" if chat else "completions",
               "json_dumps_us": best_of(old, repeat) / len(texts) * 1e6}
        if ChunkWriter is not None:
            w = ChunkWriter(rid, obj, created, model, include_usage=True, chat=chat)

            def new(w=w):
                for t in texts:
                    w.choice(0, t, None, None)

            row["chunk_writer_us"] = best_of(new, repeat) / len(texts) * 1e6
        rows.append(row)
    return rows


def print_sse(rows: list[dict]) -> None:
    print("\n== one SSE chunk, us")
    for r in rows:
        line = f"{r['route']:<12} dict + json.dumps {r['json_dumps_us']:.2f}"
        if "chunk_writer_us" in r:
            ratio = r["json_dumps_us"] / r["chunk_writer_us"]
            line += f"   chunk writer {r['chunk_writer_us']:.2f}   ({ratio:.1f}x)"
        print(line)


# ---- wakeups ----------------------------------------------------------------------------------
def bench_wakeups(streams: int, steps: int) -> list[dict]:
    """An engine-like thread puts one item per stream per step; `streams` tasks on the loop await
    their queues. Reports the putting thread's time per put and the wall time per step."""
    try:
        from falcon_mamba.server.dispatch import dispatcher_for
    except ImportError:
        dispatcher_for = None

    async def run(kind: str) -> dict:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(streams)]
        wakeups = [0]
        real = loop.call_soon_threadsafe

        def counting(*a, **k):
            wakeups[0] += 1
            return real(*a, **k)

        loop.call_soon_threadsafe = counting
        if kind == "per stream":
            def put(q, item):
                loop.call_soon_threadsafe(q.put_nowait, item)
        else:
            put = dispatcher_for(loop).put

        async def consume(q):
            for _ in range(steps):
                await q.get()

        put_s = [0.0]

        def engine():
            for k in range(steps):
                t0 = time.perf_counter()
                for q in queues:
                    put(q, (0, k))
                put_s[0] += time.perf_counter() - t0
                time.sleep(0.002)  # the next GPU step

        t0 = time.perf_counter()
        th = threading.Thread(target=engine)
        th.start()
        await asyncio.gather(*(consume(q) for q in queues))
        wall = time.perf_counter() - t0
        th.join()
        loop.call_soon_threadsafe = real
        return {"kind": kind, "streams": streams, "steps": steps,
                "engine_us_per_put": put_s[0] / (streams * steps) * 1e6,
                "wall_ms_per_step": wall / steps * 1e3, "wakeups_per_step": wakeups[0] / steps}

    kinds = ["per stream"] + (["dispatcher"] if dispatcher_for is not None else [])
    return [asyncio.run(run(k)) for k in kinds]


def print_wakeups(rows: list[dict]) -> None:
    print(f"\n== {rows[0]['streams']} streams' deltas to the loop, per step (2 ms between steps)\n"
          f"{'kind':<12}{'engine us/put':>15}{'wall ms/step':>14}{'wake-ups/step':>15}")
    for r in rows:
        print(f"{r['kind']:<12}{r['engine_us_per_put']:>15.2f}{r['wall_ms_per_step']:>14.2f}"
              f"{r['wakeups_per_step']:>15.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(HERE, ".."),
                    help="the checkout whose falcon_mamba is measured (default: this one)")
    ap.add_argument("--tokenizer", default=None, help="default: ../shared/tokenizers/falcon")
    ap.add_argument("--tokens", type=int, default=4000, help="tokens per detok stream")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", default="64,256", help="engine rows (decode batch sizes)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per engine sequence")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() before the engine section, as `falcon-mamba serve` does before serving")
    ap.add_argument("--commit", default=None, help="the commit of --root, where it has no git history")
    ap.add_argument("--out", help="also write the JSON record here")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    sys.path.insert(0, root)
    tok_dir = args.tokenizer or os.path.join(HERE, "..", "..", "shared", "tokenizers", "falcon")
    from falcon_mamba.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    skip = set(filter(None, args.skip.split(",")))
    record = {"benchmark": "stream-host", "root": root, "tokenizer": os.path.abspath(tok_dir)}
    t0 = time.perf_counter()
    has_table = getattr(tok, "byte_table", None) is not None
    record["byte_table_build_s"] = time.perf_counter() - t0 if has_table else None
    if "detok" not in skip:
        record["detok"] = bench_detok(tok, args.tokens, args.repeat)
        print_detok(record["detok"])
    record["gc_freeze"] = args.gc_freeze
    if "engine" not in skip:
        record["engine"] = bench_engine(tok_dir, [int(x) for x in args.rows.split(",")], args.new_tokens,
                                        args.gc_freeze)
        print_engine(record["engine"])
    if "sse" not in skip:
        record["sse"] = bench_sse(4000, args.repeat)
        print_sse(record["sse"])
    if "wakeups" not in skip:
        record["wakeups"] = bench_wakeups(256, 50)
        print_wakeups(record["wakeups"])
    record["env"] = env_info(root)
    if args.commit:
        record["env"]["commit"] = args.commit
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
