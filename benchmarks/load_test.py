"""Load test for an OpenAI-compatible server: many concurrent streaming clients; reports
throughput and latency percentiles (time to first token, inter-token latency, end to end).
Prints a table per scenario, then one JSON line.

    # against a running server
    PYTHONPATH=. python3 benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 64 --requests 256
    # or start `falcon-mamba serve` on a model folder, or on a random model of the given shape
    PYTHONPATH=. python3 benchmarks/load_test.py --model DIR ...
    PYTHONPATH=. python3 benchmarks/load_test.py --random tiny --out benchmarks/results/serve-load-....json
    # the serving benchmark of the README: 7B shapes (random bf16 weights, the Falcon tokenizer),
    # 1, 16, 64 and 256 streaming clients, then 32 streams beside one 100k-token prompt
    PYTHONPATH=. python3 benchmarks/load_test.py --random 7b --sweep 1,16,64,256 --mixed 32:100000 \
        --procs 8 --out bench.json

Every request streams (stream_options.include_usage) and is sent with ignore_eos, so every
answer has exactly --max-tokens tokens. The clients are asyncio tasks on httpx pools, spread over
--procs processes (one Python process cannot parse 20k SSE events a second) that start together.
A server it starts also reports its CPU time per streamed token, event loop and other threads apart
(Linux): the host work that shares the interpreter lock, which the throughput hides where the
model's step is the bound (the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# Random-model shapes (vocab 65024 and the real Falcon tokenizer).
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128),
    "small": dict(hidden_size=256, num_hidden_layers=8, intermediate_size=512),
    "7b": "falcon-mamba-7b",  # the preset, bf16, built on the GPU
}
WORDS = ("state model token stream answer river mountain question engine memory window light "
         "garden number window letter paper music signal").split()


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict:
    if not xs:
        return {f"p{p}": None for p in ps}
    s = sorted(xs)
    return {f"p{p}": s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] for p in ps}


def env_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}
    # the device machine's copy of the tree has no current git history: the caller names the commit
    info["commit"] = os.environ.get("FALCON_MAMBA_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=ROOT, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["commit"] = None
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def random_model_dir(shape: str, folder: str, tokenizer_dir: str | None = None) -> str:
    """A random-weight model with the Falcon tokenizer, saved as an HF folder (fp32 for the small
    shapes; the 7B preset in bf16, initialised on the GPU where there is one)."""
    import torch

    from falcon_mamba.checkpoint import save_model
    from falcon_mamba.config import ModelConfig, get_preset
    from falcon_mamba.model import FalconMamba

    shared = os.environ.get("FALCON_MAMBA_SHARED") or os.path.join(ROOT, "..", "shared")
    tokenizer_dir = tokenizer_dir or os.path.join(shared, "tokenizers", "falcon")
    torch.manual_seed(0)
    out = os.path.join(folder, shape)
    if isinstance(SHAPES[shape], str):
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(dev):
            model = FalconMamba(get_preset(SHAPES[shape])).to_dtype(torch.bfloat16).eval()
    else:
        model = FalconMamba(ModelConfig(vocab_size=65024, **SHAPES[shape])).eval()
    save_model(model, out, tokenizer_dir=tokenizer_dir)
    del model
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads: "loop" for its main thread (uvicorn's
    event loop: HTTP, SSE, the streams' queues), "others" for the rest summed (the engine thread,
    with the model's step in it, and the prepare pool). {} where /proc cannot say (not Linux)."""
    out = {"loop": 0.0, "others": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
            secs = (int(fields[11]) + int(fields[12])) / tick  # utime, stime: fields 14 and 15
            out["loop" if int(tid) == pid else "others"] += secs
    except (OSError, ValueError, IndexError):
        return {}
    return out


class ServerProcess:
    """`falcon-mamba serve` on 127.0.0.1 as a subprocess (so the load generator and the server do
    not share an interpreter lock)."""

    def __init__(self, model_dir: str, extra: list[str] = (), timeout: float = 300):
        import socket

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.cmd = [sys.executable, "-m", "falcon_mamba", "serve", "--model", model_dir,
                    "--port", str(port), *extra]
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"server did not start:\n{self.log.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        self.log.seek(0)
        text = self.log.read()
        self._read_to = self.log.tell()  # text files seek to tell() positions only
        self.banner = text.strip().splitlines()[-1]  # "serving ... (device, dtype, ops; slots)"

    def new_warnings(self) -> list[str]:
        """The server's WARNING/ERROR log lines since the last call (a late Triton compile, a
        failed request), to keep beside the scenario they happened in."""
        self.log.seek(self._read_to)
        text = self.log.read()
        self._read_to = self.log.tell()
        return [ln[:300] for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln][:20]

    def stop(self):
        self.proc.send_signal(2)  # Ctrl-C: a clean shutdown
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, url, model, prompt, max_tokens, temperature, headers) -> dict:
    """One streamed completion. A request that meets a closed keep-alive connection before any
    answer is sent once more, as the openai client would, and counted ("retried"): the server
    closes a connection idle for 5 s, timed from its own last write, and a client on a loaded
    machine can read an answer's end later than that and send its next request into the close."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    times, usage, status = [], None, None
    for retried in (0, 1):
        try:
            async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                status = r.status_code
                if status != 200:
                    await r.aread()
                    return {"status": status, "retried": retried}
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    d = json.loads(line[6:])
                    if d.get("usage"):
                        usage = d["usage"]
                    if any(c.get("text") for c in d.get("choices", [])):
                        times.append(time.perf_counter())
            break
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if retried or status is not None:  # a second time, or an answer had begun: a failure
                raise
    end = time.perf_counter()
    return {"status": status, "ttft": times[0] - t0 if times else None, "e2e": end - t0,
            "itl": [b - a for a, b in zip(times, times[1:])], "t0": t0, "end": end, "times": times,
            "tokens": (usage or {}).get("completion_tokens", 0),
            "prompt_tokens": (usage or {}).get("prompt_tokens", 0), "retried": retried}


async def _clients(url, model, clients, prompts, max_tokens, api_key, temperature, start_at) -> list:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                p = queue.get_nowait()
                results.append(await one_request(client, url, model, p, max_tokens, temperature, headers))

        if start_at:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*[worker() for _ in range(clients)])
    return results


def _proc_main(args) -> list:
    return asyncio.run(_clients(*args))


def _prompts(requests, prompt_words, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) + f" #{i}" for i in range(requests)]


def summarize(results: list, clients: int, requests: int, max_tokens: int, temperature: float,
              wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    gen = sum(r["tokens"] for r in ok)
    for r in results:
        r.pop("times", None)
    return {
        "clients": clients, "requests": requests, "ok": len(ok),
        "errors": {str(s): sum(1 for r in results if r["status"] == s)
                   for s in {r["status"] for r in results} if s != 200},
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / max(1, len(ok)),
        "retried_on_a_closed_keep_alive_connection": sum(r.get("retried", 0) for r in results),
        "max_tokens": max_tokens, "temperature": temperature, "wall_s": wall,
        "throughput_output_tok_s": gen / wall, "throughput_req_s": len(ok) / wall,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
    }


def run_load(url, model, clients, requests, prompt_words, max_tokens, api_key, temperature=0.7,
             seed=0, procs: int = 1) -> dict:
    """`requests` requests from `clients` concurrent streaming clients spread over `procs` client
    processes that start together; throughput over the wall time of the whole load."""
    prompts = _prompts(requests, prompt_words, seed)
    procs = max(1, min(procs, clients))
    if procs == 1:
        t0 = time.perf_counter()
        results = asyncio.run(_clients(url, model, clients, prompts, max_tokens, api_key, temperature, 0))
        return summarize(results, clients, requests, max_tokens, temperature, time.perf_counter() - t0)
    import concurrent.futures as cf
    import multiprocessing as mp

    start_at = time.time() + 3.0  # every process starts its clients at once
    jobs = [(url, model, clients // procs + (i < clients % procs), prompts[i::procs], max_tokens, api_key,
             temperature, start_at) for i in range(procs)]
    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        parts = list(ex.map(_proc_main, jobs))
    results = [r for part in parts for r in part]
    ok = [r for r in results if r["status"] == 200]
    # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux: one clock across the processes
    wall = (max(r["end"] for r in ok) - min(r["t0"] for r in ok)) if ok else 0.0
    return summarize(results, clients, requests, max_tokens, temperature, wall)


def print_steps(st: dict | None) -> None:
    if st:
        d, p = st["decode_only_ms"], st["with_prompts_ms"]
        print(f"server steps: {st['steps']}; decode only {st['decode_only_steps']} (ms p50 {d.get('p50')}, "
              f"p99 {d.get('p99')}); with prompt chunks {st['with_prompts_steps']} (ms p50 {p.get('p50')}, "
              f"p99 {p.get('p99')}, max {p.get('p100')}; {st['prompt_chunks_per_prompt_step']} chunks each)")
        gd, gp = st.get("decode_only_gpu_ms") or {}, st.get("with_prompts_gpu_ms") or {}
        if gd or gp:
            print(f"  GPU time: decode only p50 {gd.get('p50')} p99 {gd.get('p99')}; with prompt chunks "
                  f"p50 {gp.get('p50')} p99 {gp.get('p99')} max {gp.get('p100')}")
        for name in ("decode_only", "with_prompts"):
            h = st.get(f"{name}_host_ms_mean")
            if h:
                print(f"  host ms, mean of {name.replace('_', ' ')} steps: "
                      + ", ".join(f"{k} {v}" for k, v in h.items()))


def step_summary(path: str, since: int) -> tuple[dict, int]:
    """The server's --step-log lines from byte offset `since`: how many steps, their host times
    (decode-only steps and steps that read prompts apart), and the longest five as they were
    (their decode rows and prompt chunks). Returns (summary, the new offset)."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            data = f.read()
    except OSError:
        return {}, since
    end = data.rfind(b"\n") + 1  # a line still being written is read next time
    recs = [json.loads(ln) for ln in data[:end].splitlines() if ln.strip()]
    decode_only = [r["ms"] for r in recs if not r["prefill"]]
    with_prompts = [r["ms"] for r in recs if r["prefill"]]
    ms = lambda xs: {k: round(v, 2) for k, v in percentiles(xs, (50, 90, 99, 100)).items()} if xs else {}
    gpu = lambda want: ms([r["gpu_ms"] for r in recs if "gpu_ms" in r and bool(r["prefill"]) == want])
    summary = {"steps": len(recs), "decode_only_ms": ms(decode_only), "decode_only_steps": len(decode_only),
               "with_prompts_ms": ms(with_prompts), "with_prompts_steps": len(with_prompts),
               "decode_only_gpu_ms": gpu(False), "with_prompts_gpu_ms": gpu(True),
               "prompt_chunks_per_prompt_step": round(sum(r["prefill"] for r in recs if r["prefill"])
                                                      / max(1, len(with_prompts)), 2),
               "longest": sorted(recs, key=lambda r: -r["ms"])[:5]}
    for name, want in (("decode_only", False), ("with_prompts", True)):
        parts = [r["host_ms"] for r in recs if "host_ms" in r and bool(r["prefill"]) == want]
        if parts:  # mean host ms of each part of such steps (engine.Engine._log_step names them)
            keys = sorted({k for p in parts for k in p})
            summary[f"{name}_host_ms_mean"] = {k: round(sum(p.get(k, 0.0) for p in parts) / len(parts), 2)
                                              for k in keys}
    return summary, since + end


def gap_causes(results: list[dict], step_log: str | None, lo: float, hi: float) -> dict | None:
    """What the streams' long inter-token gaps in [lo, hi] held: the server steps that ended inside
    each gap over 1.5x the median (the clients' and the server's perf_counter share the machine's
    monotonic clock). One step: a slow step; two or more: the token missed a step; none: the
    token was late on its way (event loop, socket, client)."""
    if not step_log:
        return None
    gaps = sorted((b - a, a, b) for r in results if r["status"] == 200
                  for a, b in zip(r["times"], r["times"][1:]) if lo <= b <= hi)
    if not gaps:
        return None
    median = gaps[len(gaps) // 2][0]
    long = [g for g in gaps if g[0] > 1.5 * median]
    try:
        with open(step_log) as f:
            ends = sorted(rec["t"] + rec["ms"] / 1e3 for rec in map(json.loads, f) if "t" in rec)
    except (OSError, ValueError):
        return None
    import bisect

    by_steps: dict[int, int] = {}
    for _, a, b in long:
        n = bisect.bisect_right(ends, b) - bisect.bisect_right(ends, a)
        by_steps[n] = by_steps.get(n, 0) + 1
    return {"median_gap_ms": round(median * 1e3, 2), "long_gaps": len(long), "gaps": len(gaps),
            "long_gaps_by_steps_inside": dict(sorted(by_steps.items()))}


def run_mixed(url, model, streams: int, long_tokens: int, api_key, vocab: int, procs: int,
              stream_tokens: int = 2048, step_log: str | None = None) -> dict:
    """`streams` clients decode; 2 s after they start one more request sends a `long_tokens`-token
    prompt (random token ids). Reports the streams' inter-token percentiles over the time the long
    prompt is read against the same streams without it, and the long prompt's read rate (tokens /
    its time to first token). The streams decode `stream_tokens` tokens, enough to outlast it."""
    import threading

    import httpx

    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Warm-up: a prompt of a few chunks compiles the kernels of chunks that continue a state (a
    # server pays that once, at its first long prompt).
    warm = [rng.randrange(vocab) for _ in range(672)]
    httpx.post(url + "/v1/completions", json={"model": model, "prompt": warm, "max_tokens": 1},
               headers=headers, timeout=300)
    alone, alone_results = _run_load_raw(url, model, streams, streams, 24, 256, api_key, procs)
    ids = [rng.randrange(vocab) for _ in range(long_tokens)]
    out = {}
    # the same prompt with nothing else running: the server's own rate of reading it
    t = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1},
                   headers=headers, timeout=900)
    alone_s = time.perf_counter() - t if r.status_code == 200 else None
    ids = [rng.randrange(vocab) for _ in range(long_tokens)]  # another one: no prefix-cache hit

    def long_request():
        time.sleep(5.0)  # the client processes start their streams 3 s after the call, then decode
        body = {"model": model, "prompt": ids, "max_tokens": 1, "stream": False}
        out["t0"] = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=900)
        out["t1"] = time.perf_counter()
        out["status"] = r.status_code

    th = threading.Thread(target=long_request)
    th.start()
    beside, results = _run_load_raw(url, model, streams, streams, 24, stream_tokens, api_key, procs)
    th.join()
    lo, hi = out.get("t0", 0), out.get("t1", 0)
    window = [b - a for r in results if r["status"] == 200
              for a, b in zip(r["times"], r["times"][1:]) if lo <= b <= hi]
    itl_window = percentiles(window)
    secs = hi - lo
    last_token = max((t for r in results if r["status"] == 200 for t in r["times"]), default=0)
    return {"streams": streams, "long_prompt_tokens": long_tokens, "stream_tokens": stream_tokens,
            "itl_alone_s": alone["itl_s"], "itl_beside_long_prompt_s": itl_window,
            "itl_samples_beside": len(window),
            "itl_p99_ratio": itl_window["p99"] / alone["itl_s"]["p99"] if window and alone["itl_s"]["p99"]
            else None,
            "streams_outlasted_prompt": last_token >= hi,
            "long_prompt_status": out.get("status"), "long_prompt_seconds": secs,
            "long_prompt_tok_per_s": long_tokens / secs if secs > 0 else None,
            "long_prompt_alone_tok_per_s": long_tokens / alone_s if alone_s else None,
            "throughput_alone_tok_s": alone["throughput_output_tok_s"],
            "throughput_beside_tok_s": beside["throughput_output_tok_s"],
            "gap_causes_alone": gap_causes(alone_results, step_log, 0, float("inf")),
            "gap_causes_beside": gap_causes(results, step_log, lo, hi)}


def _run_load_raw(url, model, clients, requests, prompt_words, max_tokens, api_key, procs):
    """run_load's summary and its raw per-request results."""
    import concurrent.futures as cf
    import multiprocessing as mp

    prompts = _prompts(requests, prompt_words, 5)
    procs = max(1, min(procs, clients))
    start_at = time.time() + 3.0
    jobs = [(url, model, clients // procs + (i < clients % procs), prompts[i::procs], max_tokens, api_key,
             0.0, start_at) for i in range(procs)]
    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        results = [r for part in ex.map(_proc_main, jobs) for r in part]
    ok = [r for r in results if r["status"] == 200]
    wall = (max(r["end"] for r in ok) - min(r["t0"] for r in ok)) if ok else 0.0
    return summarize([dict(r) for r in results], clients, requests, max_tokens, 0.0, wall), results


def print_table(s: dict) -> None:
    print(f"{s['ok']}/{s['requests']} requests ok from {s['clients']} clients in {s['wall_s']:.1f} s; "
          f"errors {s['errors'] or 'none'}")
    print(f"throughput: {s['throughput_output_tok_s']:.1f} output tok/s, {s['throughput_req_s']:.2f} req/s")
    if "server_cpu_us_per_token" in s:
        per = s["server_cpu_us_per_token"]
        print(f"server CPU per token: event loop {per['loop']:.1f} us, other threads (engine, model) "
              f"{per['others']:.1f} us")
    print(f"{'latency (ms)':<22}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, key in (("time to first token", "ttft_s"), ("inter-token", "itl_s"), ("end to end", "e2e_s")):
        row = s[key]
        print(f"{name:<22}" + "".join(f"{(row[p] or 0) * 1e3:>10.1f}" for p in ("p50", "p90", "p99")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="start falcon-mamba's server on this model folder, in process")
    src.add_argument("--random", choices=sorted(SHAPES), help="start it on a random model of this shape")
    ap.add_argument("--model-id", help="model id to send (default: the server's first model)")
    ap.add_argument("--api-key", default=os.environ.get("FALCON_MAMBA_API_KEY"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=64, help="state slots of a started server")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of a started server")
    ap.add_argument("--procs", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--sweep", default=None, metavar="N,N,...",
                   help="run one scenario per client count (requests = 3 x clients, at least 8)")
    ap.add_argument("--mixed", default=None, metavar="STREAMS:TOKENS",
                   help="then STREAMS decoding clients beside one TOKENS-token prompt")
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer of a --random model "
                                                         "(default ../shared/tokenizers/falcon)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for a started server (repeatable)")
    ap.add_argument("--out", help="also write the JSON record to this file")
    ap.add_argument("--note", default="", help="free text stored with the result")
    args = ap.parse_args(argv)
    import httpx

    server, record = None, {"benchmark": "serve-load", "note": args.note}
    tmp = tempfile.TemporaryDirectory()
    scenarios: list[dict] = []

    def save() -> str:
        """The record so far, also to --out (after every part: a run cut short keeps its parts)."""
        if not args.sweep and scenarios:
            record.update(scenarios[0])
        elif scenarios:
            record["scenarios"] = scenarios
        record["env"] = env_info()
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(record, indent=2) + "\n")
        return json.dumps(record)

    # a timeout's SIGTERM: stop the server and keep the parts measured (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            folder = args.model or random_model_dir(args.random, tmp.name, args.tokenizer_dir)
            step_log = os.path.join(tmp.name, "steps.jsonl")
            extra = ["--max-batch", str(args.slots), "--max-queue", str(max(args.requests, 4 * args.slots)),
                     "--step-log", step_log, *args.server_arg]
            if args.threads:
                extra += ["--threads", str(args.threads)]
            server = ServerProcess(folder, extra)
            url = server.url
            record["server"] = {"model": args.model or f"random {args.random}",
                                "config": SHAPES.get(args.random), "command": " ".join(server.cmd[1:]),
                                "banner": server.banner}
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model_id or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        # Warm-up: the first forward passes pay one-time costs (imports, allocator, new shapes).
        run_load(url, model, 2, 2, args.prompt_words, 4, args.api_key, seed=1)
        log_at = step_summary(step_log, 0)[1] if server is not None else 0
        levels = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.clients]
        for n in levels:
            reqs = args.requests if not args.sweep else max(8, 3 * n)
            cpu0 = thread_cpu(server.proc.pid) if server is not None else {}
            s = run_load(url, model, n, reqs, args.prompt_words, args.max_tokens, args.api_key,
                         args.temperature, procs=args.procs)
            cpu1 = thread_cpu(server.proc.pid) if server is not None else {}
            if cpu0 and cpu1:  # the server's host time per streamed token, by thread
                tokens = s["throughput_output_tok_s"] * s["wall_s"]
                s["server_cpu_s"] = {k: cpu1[k] - cpu0[k] for k in cpu0}
                s["server_cpu_us_per_token"] = {k: v / max(1.0, tokens) * 1e6
                                                for k, v in s["server_cpu_s"].items()}
            if server is not None:
                s["server_steps"], log_at = step_summary(step_log, log_at)
                s["server_warnings"] = server.new_warnings()
                for ln in s["server_warnings"]:
                    print("server:", ln)
            print_table(s)
            print_steps(s.get("server_steps"))
            scenarios.append(s)
            save()
        if args.mixed:
            streams, tokens = (int(x) for x in args.mixed.split(":"))
            vocab = 65024
            m = run_mixed(url, model, streams, tokens, args.api_key, vocab, args.procs,
                          step_log=step_log if server is not None else None)
            beside = (m["itl_beside_long_prompt_s"]["p99"] or 0) * 1e3
            print(f"mixed: {streams} streams, inter-token p99 {m['itl_alone_s']['p99'] * 1e3:.1f} ms alone, "
                  f"{beside:.1f} ms beside a {tokens:,}-token prompt (x{m['itl_p99_ratio'] or 0:.2f}); "
                  f"the prompt read at {m['long_prompt_tok_per_s'] or 0:,.0f} tok/s "
                  f"({m['long_prompt_alone_tok_per_s'] or 0:,.0f} alone) "
                  f"(status {m['long_prompt_status']})")
            if server is not None:
                m["server_steps"], log_at = step_summary(step_log, log_at)
                print_steps(m["server_steps"])
                m["server_warnings"] = server.new_warnings()
            record["mixed"] = m
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
        line = save()
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
