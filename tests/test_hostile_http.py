"""Hostile HTTP clients: no request body is a 500, no connection is reset after an error, half-sent
requests are dropped after the header/body timeouts, big bodies and broken chat templates never
block the event loop, an abandoned upload is one log line.

A real uvicorn server in a thread of this process (tiny random model, the Falcon tokenizer), and
raw sockets where keep-alive and timeouts are the point. Request bodies are drawn by hypothesis.
"""

import json
import logging
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import falcon_mamba.chat_template as CT
from falcon_mamba.checkpoint import load_model
from falcon_mamba.engine.engine import Engine, EngineConfig
from falcon_mamba.server import ServerSettings, make_server
from falcon_mamba.tokenizer import load_tokenizer
from tests.test_server import TOKENIZER_DIR, free_port, make_model_dir

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
SLOTS, WAITING = 4, 8


class Server:
    def __init__(self, model, tok, **engine_kw):
        kw = dict(num_slots=SLOTS, max_waiting=WAITING, prefill_chunk=64, max_context=64) | engine_kw
        self.engine = Engine(model, tok, EngineConfig(**kw))
        self.engine.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings_ = ServerSettings("tiny", max_body_bytes=4 << 20, header_timeout_s=1.0, body_timeout_s=1.0)
        self.server = make_server(self.engine, tok, settings_, port=self.port, grace_s=1)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = make_model_dir(tmp_path_factory.mktemp("tiny") / "tiny")
    yield load_model(d), d
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def srv(model):
    s = Server(model[0], load_tokenizer(model[1]))
    yield s
    s.stop()


def template_tok(tmp_path, template):
    shutil.copy(f"{TOKENIZER_DIR}/tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                "chat_template": template}))
    return load_tokenizer(tmp_path)


# ---- raw HTTP/1.1 on one keep-alive connection -------------------------------------------------
def request(sock, method: str, path: str, body: bytes = b"", timeout=30.0):
    """Send one request on sock and read its (Content-Length) response: (status, headers, body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, "the server closed the connection"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(rest) < n:
        more = sock.recv(65536)
        assert more, "the server closed the connection mid-response"
        rest += more
    return int(lines[0].split()[1]), headers, rest[:n]


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


C = b'{"model": "tiny", "prompt": "x", '
BAD_BODIES = [
    ("/v1/completions", b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", C + b'"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("/v1/completions", C + b'"max_tokens": ' + b"9" * 4000 + b"}", "max_tokens"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "lone surrogate"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": "\\udfff"}', "lone surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "lone surrogate"),
    ("/v1/completions", b'{"model": "tiny", "prompt": [[1e400]]}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": [[' + b"9" * 400 + b"]]}", "token ids"),
    ("/v1/completions", C + b'"temperature": ' + b"9" * 400 + b"}", "temperature"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "n": 5}', "state slots"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": ["x"] * (SLOTS + WAITING + 1)}).encode(),
     "never be queued"),
    ("/v1/completions", b'\xff\xfe{"model"', "not valid JSON"),
    ("/v1/completions", b"", "not valid JSON"),
]


def test_bad_bodies_are_400_and_the_connection_lives_on(srv):
    sock = connect(srv)
    good = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 2}).encode()
    for path, body, words in BAD_BODIES:
        status, _, data = request(sock, "POST", path, body)
        assert status == 400, (body[:60], status, data[:300])
        assert words in json.loads(data)["error"]["message"], (body[:60], data[:300])
        status, _, data = request(sock, "POST", "/v1/completions", good)  # same connection
        assert status == 200, data
    sock.close()


def test_an_internal_error_is_a_json_500_and_the_connection_lives_on(srv, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    sock = connect(srv)
    monkeypatch.setattr(srv.engine, "submit", boom)
    status, _, data = request(sock, "POST", "/v1/completions", b'{"model": "tiny", "prompt": "x"}')
    assert status == 500 and json.loads(data)["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert request(sock, "GET", "/health")[0] == 200
    sock.close()


_JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
                     | st.floats(allow_subnormal=False).filter(lambda x: x != x or x == 0 or abs(x) > 1e-6)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
           "top_k", "n", "stream", "stop", "seed", "logprobs", "top_logprobs", "stream_options", "min_p",
           "repetition_penalty", "ignore_eos", "best_of", "echo", "tools", "response_format", "user"]
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                  "content": st.text(max_size=30) | _JSON})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6),
       model_ok=st.booleans(), prompt=st.text(max_size=40) | st.lists(st.integers(-5, 70000), max_size=5),
       messages=st.lists(_MESSAGE, max_size=3), chat=st.booleans())
def test_request_bodies_property(srv, body, model_ok, prompt, messages, chat):
    if model_ok:
        body["model"] = "tiny"
    body.setdefault("messages" if chat else "prompt", messages if chat else prompt)
    body["stream"] = False if body.get("stream") is True else body.get("stream")  # streams: below
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body))
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert isinstance(r.json()["error"]["message"], str)
        assert c.get("/health").status_code == 200  # the same keep-alive connection


def test_half_sent_requests_are_dropped_after_the_timeouts(srv):
    s = connect(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")  # half a head, then silence
    t0 = time.monotonic()
    s.settimeout(10)
    assert s.recv(100) == b""  # closed by the server
    assert time.monotonic() - t0 < 4
    s.close()
    s = connect(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"model\"")
    t0 = time.monotonic()
    s.settimeout(10)
    data = b""
    while b"did not arrive" not in data:
        more = s.recv(4096)
        if not more:
            break
        data += more
    assert data.startswith(b"HTTP/1.1 408") and b"did not arrive within" in data, data
    assert time.monotonic() - t0 < 4
    s.close()
    assert httpx.get(srv.url + "/health").status_code == 200


def test_an_abandoned_upload_is_one_log_line(srv, caplog):
    caplog.set_level(logging.INFO)
    s = connect(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n{\"model\": ")
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)
    records = [r for r in caplog.records if r.name.startswith(("falcon_mamba", "uvicorn"))]
    assert len(records) == 1 and "closed the connection" in records[0].getMessage(), \
        [r.getMessage() for r in records]
    assert records[0].exc_info is None and records[0].levelno <= logging.INFO


def _health_latencies(srv, stop: threading.Event, out: list):
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            out.append(time.monotonic() - t0)
            time.sleep(0.02)


def test_a_big_body_does_not_block_the_event_loop(srv):
    # 2.4 MB of prompts just under the old "tokenize in a thread" threshold, as in the issue
    prompts = [("word " * 3999 + "\n")] * 120
    body = json.dumps({"model": "tiny", "prompt": prompts[:SLOTS + WAITING], "max_tokens": 10**6}).encode()
    body = body.replace(b'"max_tokens"', json.dumps({"x": prompts}).encode()[1:-1] + b', "max_tokens"')
    stop, lat = threading.Event(), []
    t = threading.Thread(target=_health_latencies, args=(srv, stop, lat))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", content=body, timeout=60)
    took = time.monotonic() - t0
    stop.set()
    t.join()
    assert r.status_code == 400 and "max_tokens" in r.text  # tokenized, then over max_context
    assert max(lat) < max(1.0, took / 3), (max(lat), took)


def test_broken_chat_templates_are_400_and_never_block_the_loop(model, tmp_path, monkeypatch):
    monkeypatch.setattr(CT, "TIME_LIMIT_S", 1.5)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for template, words in ((HANG, "took over 1.5 s"), ("{{ messages.__class__.__base__ }}", "sandbox"),
                            ("{{ 'a' * 4000000000 }}", "too large"), ("{{ raise_exception('no system') }}",
                                                                     "no system")):
        d = tmp_path / str(abs(hash(template)))
        d.mkdir()
        s = Server(model[0], template_tok(d, template))
        try:
            stop, lat = threading.Event(), []
            t = threading.Thread(target=_health_latencies, args=(s, stop, lat))
            t.start()
            r = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=30)
            stop.set()
            t.join()
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            assert max(lat, default=0) < 1.0, lat
        finally:
            s.stop()


def test_chat_stops_at_the_templates_end_of_turn_and_says_which_template(model, srv, tmp_path, monkeypatch):
    s = Server(model[0], template_tok(tmp_path, CHATML))
    seen = []
    submit = s.engine.submit

    def spy(ids, params, **kw):
        seen.append(params)
        return submit(ids, params, **kw)

    monkeypatch.setattr(s.engine, "submit", spy)
    try:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": "x"})
        assert r.status_code == 200 and r.headers["x-chat-template"] == "tokenizer_config.json"
        assert seen[-1].stop == ("x", "<|im_end|>")
    finally:
        s.stop()
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-chat-template"] == "fallback"
