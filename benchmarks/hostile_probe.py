"""Hostile-input probe: the classes of issue #16 tried against whatever falcon_mamba is on the path,
counted by outcome. Run it on two checkouts to compare (CPU, a few minutes):

    PYTHONPATH=. python3 benchmarks/hostile_probe.py                 # this checkout
    PYTHONPATH=/path/to/old/checkout python3 benchmarks/hostile_probe.py

Outcomes: ok (a clean answer or one-line error), traceback, http500, reset (the keep-alive connection
died after an error), hang (no answer within the probe's limit, or the event loop blocked), deleted
(a file outside the output changed or vanished), accepted (bad input taken silently), leak (a file
left behind or a private mode). Prints a table by class, then one JSON line. Only stable interfaces
are used (the CLI's main, load_model, load_state, save_model, the server), so old code runs it too.
Sampler numerics (temperature 1e-300 ...) are left to the decode rewrite's tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import falcon_mamba as fm  # noqa: E402
from falcon_mamba import default_model  # noqa: E402
from falcon_mamba.cli import main  # noqa: E402

MODEL = default_model.path()
RESULTS: dict[str, Counter] = defaultdict(Counter)
DETAILS: list[tuple[str, str, str]] = []


def record(cls: str, what: str, outcome: str) -> None:
    RESULTS[cls][outcome] += 1
    if outcome != "ok":
        DETAILS.append((cls, what, outcome))


def _cli_here(argv, stdin: str | None) -> tuple[str, int | None, str]:
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:
                rc = e.code
    except BaseException:  # noqa: BLE001 - an escaping exception is what we count
        return "traceback", None, err.getvalue()
    text = err.getvalue()
    return ("traceback" if "Traceback" in text else "ok"), rc, text


def cli(argv, stdin: str | None = None, timeout_s: float = 60.0) -> tuple[str, int | None, str]:
    """Run the CLI in a forked child (so a run that never ends can be killed): ('ok' | 'traceback'
    | 'hang', exit status, stderr)."""
    import select
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: everything is imported already, so this is fast
        os.close(r)
        try:
            result = _cli_here(argv, stdin)
        except BaseException:  # noqa: BLE001
            result = ("traceback", None, "")
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], timeout_s)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        return "hang", None, ""
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if not data:
        return "traceback", None, "the child died"
    outcome, rc, text = json.loads(data)
    return outcome, rc, text


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def copy_model(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(MODEL / f, dest / f)
    return dest


# ---- CLI ----------------------------------------------------------------------------------------
def probe_cli(tmp: Path) -> None:
    a_file = tmp / "afile"
    a_file.write_text("x")
    g = ["generate", "hi", "--max-new-tokens", "2"]
    flags = [
        ["--device", "bogus"],
        ["--device", "tpu"],
        ["--seed", str(2**64)],
        ["--seed", "-1"],
        ["--top-k", str(10**20)],
        ["--temperature", "nan"],
        ["--temperature", "1e400"],
        ["--top-p", "inf"],
        ["--max-new-tokens", str(10**12)],
        ["--stop-token-id", "-3"],
        ["--chunk-size", "-1"],
        ["--dtype", "int7"],
        ["--prompt-file", "/dev/null"],
        ["--prompt-file", str(tmp)],
        ["--state-in", str(tmp)],
    ]
    if not torch.cuda.is_available():
        flags.append(["--device", "cuda"])
    for f in flags:
        outcome, rc, _ = cli([*g, *f])
        record("8 CLI tracebacks", " ".join(f), outcome)
    outcome, rc, _ = cli(["generate", "a\udcffb", "--max-new-tokens", "2"])
    record("8 CLI tracebacks", "argv not UTF-8", outcome)
    for what, argv in [
        ("info --device bogus", ["info", "--device", "bogus"]),
        ("quantize --out .", ["quantize", "--model", MODEL, "--bits", "8", "--out", "."]),
        (
            "prepare-data --doc-separator \\x",
            ["prepare-data", "--tokenizer", MODEL, "--out", tmp / "pd", "--doc-separator", "\\x", a_file],
        ),
        ("train --set lr=nan", ["train", "--data", tmp / "nodata", "--out", tmp / "r", "--set", "lr=nan"]),
        (
            "serve --prefix-cache-dir FILE",
            ["serve", "--model", MODEL, "--prefix-cache-dir", a_file, "--port", "1"],
        ),
        (
            "serve --state-memory 1e400GiB",
            ["serve", "--model", MODEL, "--state-memory", "1e400GiB", "--port", "1"],
        ),
    ]:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            outcome, rc, _ = cli(argv)
        finally:
            os.chdir(cwd)
        record("8 CLI tracebacks", what, outcome)
    # train --out an existing file, and a data folder whose meta says vocab_size 1e12
    (tmp / "in.txt").write_text("hello world, a small corpus\n" * 100)
    cli(["prepare-data", "--tokenizer", MODEL, "--out", tmp / "data", tmp / "in.txt"])
    outcome, rc, _ = cli(["train", "--data", tmp / "data", "--out", a_file, "--steps", "1"])
    record("8 CLI tracebacks", "train --out FILE", outcome if rc != 0 else "accepted")
    meta = json.loads((tmp / "data" / "meta.json").read_text())
    meta["vocab_size"] = 1e12
    shutil.copytree(tmp / "data", tmp / "data1e12")
    (tmp / "data1e12" / "meta.json").write_text(json.dumps(meta))
    outcome, rc, _ = cli(["train", "--data", tmp / "data1e12", "--out", tmp / "r2", "--steps", "1"])
    record("8 CLI tracebacks", "data meta vocab_size 1e12", outcome if rc != 0 else "accepted")
    # silently accepted (the port is taken, so a server that starts anyway stops at once)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = str(busy.getsockname()[1])
    for what, argv in [
        (
            "train --stop-at -1",
            ["train", "--data", tmp / "data", "--out", tmp / "r3", "--steps", "1", "--stop-at", "-1"],
        ),
        (
            "serve --shutdown-grace nan",
            ["serve", "--model", MODEL, "--shutdown-grace", "nan", "--port", taken],
        ),
    ]:
        outcome, rc, err = cli(argv)
        bad = (
            outcome
            if outcome != "ok"
            else ("accepted" if rc == 0 or "shutdown" not in err and "stop-at" not in err else "ok")
        )
        record("10 silently accepted", what, bad)
    busy.close()
    outcome, rc, err = cli(["generate", "-", "--max-new-tokens", "2"], stdin="caf\udce9")  # surrogateescape'd
    record("10 silently accepted", "non-UTF-8 stdin", outcome if rc != 0 else "accepted")


def probe_info(tmp: Path) -> None:
    base = json.loads((MODEL / "config.json").read_text())

    def folder(name, config=None, weights="copy", extra=None):
        d = tmp / "info" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**base, **(config or {})}))
        src = MODEL / "model.safetensors"
        if weights == "copy":
            os.symlink(src, d / "model.safetensors")
        elif weights == "truncated":
            (d / "model.safetensors").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        elif weights == "empty":
            (d / "model.safetensors").write_bytes(b"")
        elif weights == "pickle":
            (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
        for k, v in (extra or {}).items():
            (d / k).write_text(v)
        return d

    idx = {"weight_map": {"backbone.embeddings.weight": "../other/model.safetensors"}}
    cases = {
        "truncated": folder("t", weights="truncated"),
        "empty": folder("e", weights="empty"),
        "pickle only": folder("p", weights="pickle"),
        "no weights": folder("n", weights=None),
        "NaN eps": folder("nan", {"layer_norm_epsilon": float("nan")}),
        "hidden 1e12": folder("h", {"hidden_size": 10**12}),
        "hidden 256.9": folder("f", {"hidden_size": 256.9}),
        "eos abc": folder("ea", {"eos_token_id": "abc"}),
        "eos -3": folder("en", {"eos_token_id": -3}),
        "eos 1e9": folder("eb", {"eos_token_id": 10**9}),
        "weight_map list": folder(
            "wl", weights=None, extra={"model.safetensors.index.json": '{"weight_map": []}'}
        ),
        "index ../other": folder("wo", weights=None, extra={"model.safetensors.index.json": json.dumps(idx)}),
    }
    for what, d in cases.items():
        outcome, rc, _ = cli(["info", "--model", d])
        record("7 info exits 0", what, outcome if outcome != "ok" else ("accepted" if rc == 0 else "ok"))
        try:
            fm.load_model(d)
            record("9 bad configs", what, "accepted")
        except fm.UserError:
            record("9 bad configs", what, "ok")
        except Exception:  # noqa: BLE001
            record("9 bad configs", what, "traceback")
    if not torch.cuda.is_available():
        outcome, rc, _ = cli(["info", "--device", "cuda"])
        record("7 info exits 0", "--device cuda without CUDA", outcome if rc != 0 else "accepted")
    st = fm.load_model(MODEL).new_state(1)
    st.ssm.fill_(3e38)
    st.save(tmp / "big.state")
    try:
        fm.load_state(tmp / "big.state", fm.load_model(MODEL))
        record("9 bad configs", "state 3e38", "accepted")
    except fm.UserError:
        record("9 bad configs", "state 3e38", "ok")


def probe_outputs(tmp: Path) -> None:
    victim = tmp / "victim"
    copy_model(victim / "m")
    before = snapshot(victim)
    cli(["quantize", "--model", victim / "m", "--bits", "8", "--out", victim])
    record("2 folders deleted", "quantize --out victim", "ok" if snapshot(victim) == before else "deleted")
    d = tmp / "D"
    d.mkdir()
    (d / "in.txt").write_text("text\n" * 100)
    before = snapshot(d)
    cli(["prepare-data", "--tokenizer", MODEL, "--overwrite", "--out", d, d / "in.txt"])
    record(
        "2 folders deleted",
        "prepare-data --overwrite --out D D/in.txt",
        "ok" if (d / "in.txt").exists() and snapshot(d) == before else "deleted",
    )
    spill = tmp / "spill"
    spill.mkdir()
    (spill / "mine.txt").write_text("keep")
    from falcon_mamba.engine.prefix_cache import PrefixCache

    try:
        PrefixCache(1 << 20, spill_dir=spill, max_disk_bytes=1 << 20).close()
    except Exception:  # noqa: BLE001
        pass
    record(
        "2 folders deleted", "--prefix-cache-dir DIR", "ok" if (spill / "mine.txt").exists() else "deleted"
    )
    # --state-out checked before the work, and chat /save /load
    (tmp / "afile").write_text("x")
    for what, target in (
        ("folder", tmp),
        ("under a file", tmp / "afile" / "s"),
        ("unwritable", Path("/proc/x.state")),
    ):
        t0 = time.monotonic()
        outcome, rc, err = cli(
            ["generate", "-", "--state-out", target, "--max-new-tokens", "2"], stdin="hello"
        )
        ok = outcome == "ok" and rc != 0 and "Traceback" not in err and "state" in err.lower()
        # "thrown away": the failure came after generating (stdout got text) or as a traceback
        record(
            "6 work thrown away",
            f"--state-out {what}",
            "ok" if ok and time.monotonic() - t0 < 30 else outcome if outcome != "ok" else "thrown away",
        )
    lines = [f"/save {tmp}", f"/save {tmp}/afile/x", f"/load {tmp}", "/quit"]
    for line in lines[:3]:
        outcome, rc, err = cli(["chat", "--max-new-tokens", "2"], stdin=line + "\n/quit\n")
        record(
            "6 work thrown away", f"chat {line.split()[0]} bad path", outcome if rc == 0 else "thrown away"
        )


def probe_files(tmp: Path) -> None:
    old = os.umask(0o022)
    try:
        fm.save_model(fm.load_model(MODEL), tmp / "saved")
    finally:
        os.umask(old)
    mode = (tmp / "saved" / "model.safetensors").stat().st_mode & 0o777
    record("11 leaks", "weights mode with umask 022", "ok" if mode == 0o644 else "leak")
    # a temp folder left by a killed writer (simulated: the name a writer uses, a dead pid)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    for pattern in (f"saved.{dead}.abcd1234.tmp", "saved.abcd1234.tmp"):
        (tmp / pattern).mkdir()
    for pattern in (f"s.state.{dead}.abcd1234.tmp",):
        (tmp / pattern).write_text("half")
    fm.save_model(fm.load_model(MODEL), tmp / "saved")
    fm.load_model(MODEL).new_state(1).save(tmp / "s.state")
    left = [p.name for p in tmp.iterdir() if p.name.endswith(".tmp") and dead in p.name]
    record("11 leaks", "temp files of a killed writer", "leak" if left else "ok")


def probe_tokens() -> None:
    """12: the whole prompt tokenized at once (a fresh process; the peak RSS is reset first)."""
    code = (
        "import re; from falcon_mamba.tokenizer import load_tokenizer\n"
        "from falcon_mamba import default_model\n"
        "def rss(k):\n"
        "    return int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "t = load_tokenizer(default_model.path())\n"
        "s = ''.join(f'The {i}th player of {i * 7919 % 10007} acts, exits; enters.\\n'\n"
        "            for i in range(25000))\n"
        "open('/proc/self/clear_refs', 'w').write('5'); b = rss('VmRSS'); t.encode(s)\n"
        "print(len(s), rss('VmHWM') - b)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    n, peak = map(int, r.stdout.split())
    what = f"encode {n:,} chars: +{peak / 2**20:.0f} MiB peak"
    record("12 long prompt memory", what, "ok" if peak < 40 * n else "unbounded")
    DETAILS.append(("12 long prompt memory", what, "measured"))


# ---- HTTP ----------------------------------------------------------------------------------------
def start_server(model, tok, **kw):
    import inspect

    from falcon_mamba.engine.engine import Engine, EngineConfig
    from falcon_mamba.server import ServerSettings, make_server

    engine = Engine(model, tok, EngineConfig(num_slots=4, max_waiting=8, prefill_chunk=64, max_context=256))
    engine.start()
    extra = {
        k: v
        for k, v in (("header_timeout_s", 2.0), ("body_timeout_s", 2.0))
        if k in inspect.signature(ServerSettings).parameters
    }
    settings = ServerSettings("tiny", max_body_bytes=32 << 20, **extra)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(engine, tok, settings, port=port, grace_s=1)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    return server, t, port


def exchange(sock, method, path, body=b""):
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return None
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    while len(rest) < n:
        more = sock.recv(65536)
        if not more:
            return None
        rest += more
    return int(head.split()[1])


def probe_http(tmp: Path) -> None:
    model = fm.load_model(MODEL)
    tok = fm.load_tokenizer(MODEL)
    server, thread, port = start_server(model, tok)
    good = b'{"model": "tiny", "prompt": "Hello", "max_tokens": 2}'
    c = b'{"model": "tiny", "prompt": "x", '
    bodies = {
        "deep JSON": ("/v1/completions", b"[" * 100_000),
        "5000-digit max_tokens": ("/v1/completions", c + b'"max_tokens": ' + b"9" * 5000 + b"}"),
        "4000-digit max_tokens": ("/v1/completions", c + b'"max_tokens": ' + b"9" * 4000 + b"}"),
        "lone surrogate prompt": ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}'),
        "lone surrogate stop": ("/v1/completions", c + b'"stop": "\\udfff"}'),
        "lone surrogate message": (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        ),
        "400-digit temperature": ("/v1/completions", c + b'"temperature": ' + b"9" * 400 + b"}"),
        "400-digit token id": ("/v1/completions", b'{"model": "tiny", "prompt": [[' + b"9" * 400 + b"]]}"),
        "not UTF-8": ("/v1/completions", b'\xff\xfe{"model"'),
        "n > slots": ("/v1/completions", c + b'"n": 5}'),
        "prompts > slots + queue": (
            "/v1/completions",
            json.dumps({"model": "tiny", "prompt": ["x"] * 13}).encode(),
        ),
    }
    for what, (path, body) in bodies.items():
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            status = exchange(sock, "POST", path, body)
            if status is None:
                record("4 HTTP 500", what, "reset")
                continue
            cls = "5 429 for n > slots" if what in ("n > slots", "prompts > slots + queue") else "4 HTTP 500"
            record(cls, what, "http500" if status >= 500 else "429" if status == 429 else "ok")
            again = exchange(sock, "POST", "/v1/completions", good)
            record("4 keep-alive after an error", what, "ok" if again == 200 else "reset")
        except OSError:
            record("4 keep-alive after an error", what, "reset")
        finally:
            sock.close()
    # half-sent head and body: held forever?
    for what, data in (
        ("half a head", b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"),
        ("half a body", b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"),
    ):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(data)
        sock.settimeout(15)
        try:
            got = sock.recv(100)
            record(
                "5 event loop / timeouts",
                what,
                "ok" if got == b"" or got.startswith(b"HTTP/1.1 408") else "hang",
            )
        except TimeoutError:
            record("5 event loop / timeouts", what, "hang")
        sock.close()
    # aborted upload: log records with tracebacks
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, r):
            self.records.append(r)

    h = Collect()
    for name in ("falcon_mamba", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).addHandler(h)
    logging.getLogger("falcon_mamba").setLevel(logging.INFO)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n{"model": ')
    time.sleep(0.3)
    sock.close()
    time.sleep(1.0)
    tracebacks = sum(1 for r in h.records if r.exc_info)
    record(
        "5 event loop / timeouts",
        f"aborted upload ({tracebacks} tracebacks logged)",
        "ok" if tracebacks == 0 and len(h.records) <= 1 else "traceback",
    )
    # a 15 MiB body of long prompts: is /health answered meanwhile?
    body = json.dumps({"model": "tiny", "prompt": ["word " * 3999] * 786, "max_tokens": 10**6}).encode()
    lat = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            t0 = time.monotonic()
            exchange(s, "GET", "/health")
            lat.append(time.monotonic() - t0)
            s.close()
            time.sleep(0.05)

    pt = threading.Thread(target=poll)
    pt.start()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    t0 = time.monotonic()
    status = exchange(sock, "POST", "/v1/completions", body)
    took = time.monotonic() - t0
    stop.set()
    pt.join()
    sock.close()
    record(
        "5 event loop / timeouts",
        f"15 MiB body ({took:.1f} s, health max {max(lat):.2f} s, status {status})",
        "hang" if max(lat) > 2.0 else "429" if status == 429 else "ok",
    )
    server.should_exit = True
    thread.join(30)
    # chat templates from the model folder
    templates = {
        "SecurityError": "{{ messages.__class__.__mro__ }}",
        "UndefinedError": "{{ foo.bar }}",
        "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
        "{% endfor %}",
        "'a' * 4000000000": "{{ 'a' * 4000000000 }}",
    }
    for what, template in templates.items():
        d = tmp / f"tpl{abs(hash(what))}"
        d.mkdir()
        shutil.copyfile(MODEL / "tokenizer.json", d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(
            json.dumps({"eos_token": "<|endoftext|>", "chat_template": template})
        )
        # the CLI (a subprocess: a hang must be killable)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        code = (
            "import sys; from falcon_mamba.tokenizer import load_tokenizer; t = load_tokenizer(sys.argv[1]); "
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}])"
        )
        try:
            r = subprocess.run(
                [sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=30, env=env
            )
            record(
                "3 chat templates",
                f"{what} (chat)",
                "traceback"
                if "Traceback" in r.stderr and "UserError" not in r.stderr.splitlines()[-1]
                else "ok",
            )
        except subprocess.TimeoutExpired:
            record("3 chat templates", f"{what} (chat)", "hang")
        if what in ("nested range loops", "'a' * 4000000000"):
            continue  # in-process, a hang or a 4 GB allocation would stop the probe itself
        server, thread, port = start_server(model, fm.load_tokenizer(d))
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        status = exchange(
            sock,
            "POST",
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
        )
        record("3 chat templates", f"{what} (server)", "http500" if status is None or status >= 500 else "ok")
        sock.close()
        server.should_exit = True
        thread.join(30)


def main_() -> None:
    torch.set_num_threads(1)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, fn in (
            ("cli", probe_cli),
            ("info", probe_info),
            ("outputs", probe_outputs),
            ("files", probe_files),
            ("http", probe_http),
        ):
            sub = tmp / name
            sub.mkdir()
            fn(sub)
        probe_tokens()
    width = max(map(len, RESULTS))
    print(f"{'class':<{width}}  cases  not ok")
    for cls in sorted(RESULTS, key=lambda c: int(c.split()[0])):
        c = RESULTS[cls]
        print(
            f"{cls:<{width}}  {sum(c.values()):>5}  {sum(v for k, v in c.items() if k != 'ok'):>6}  {dict(c)}"
        )
    for cls, what, outcome in DETAILS:
        print(f"  {outcome:<11} {cls}: {what}")
    total = Counter()
    for c in RESULTS.values():
        total.update(c)
    print(
        json.dumps(
            {
                "cases": sum(total.values()),
                "outcomes": dict(total),
                "seconds": round(time.monotonic() - t0),
                "falcon_mamba": str(Path(fm.__file__).parent),
            }
        )
    )


if __name__ == "__main__":
    main_()
