"""The OpenAI-compatible server, end to end over 127.0.0.1 with the real `openai` client.

A tiny random model (fp32, vocab 65024) with the real Falcon tokenizer; servers run in threads of
this process on free ports. Torch runs one thread here: on a shared 2-core machine that is both
faster and steadier than two.
"""

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="the dev extra installs openai")

from falcon_mamba.checkpoint import load_model, save_model  # noqa: E402
from falcon_mamba.config import ModelConfig  # noqa: E402
from falcon_mamba.engine.engine import Engine, EngineConfig  # noqa: E402
from falcon_mamba.model import FalconMamba  # noqa: E402
from falcon_mamba.server import ServerSettings, make_server  # noqa: E402
from falcon_mamba.tokenizer import load_tokenizer  # noqa: E402
from tests.conftest import SHARED  # noqa: E402

TOKENIZER_DIR = os.path.join(SHARED, "tokenizers", "falcon")
TINY = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=65024)
MAX_CONTEXT = 1024
MAX_BODY = 64 * 1024


def make_model_dir(path):
    torch.manual_seed(0)
    save_model(FalconMamba(TINY).eval(), path, tokenizer_dir=TOKENIZER_DIR)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """An engine + uvicorn server in a background thread."""

    def __init__(self, model, tok, api_key=None, drain=True, engine=None, **engine_kw):
        self.engine = engine or Engine(model, tok, EngineConfig(**engine_kw))
        if engine is None:
            self.engine.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = ServerSettings("tiny", api_key=api_key, max_body_bytes=MAX_BODY)
        self.server = make_server(self.engine, tok, settings, port=self.port, grace_s=2, drain=drain)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, **kw):
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def aclient(self, **kw):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=120, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = make_model_dir(tmp_path_factory.mktemp("tiny") / "tiny")
    yield load_model(d), load_tokenizer(d)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def srv(model_and_tok):
    model, tok = model_and_tok
    s = Running(model, tok, num_slots=64, max_waiting=64, prefill_chunk=64, max_context=MAX_CONTEXT,
                cache_bytes=1 << 26)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(model_and_tok):
    """Two slots, one waiting place, small prefill chunks."""
    model, tok = model_and_tok
    s = Running(model, tok, num_slots=2, max_waiting=1, prefill_chunk=16)
    yield s
    s.stop()


def wait_idle(engine, timeout=20):
    deadline = time.monotonic() + timeout
    while engine.scheduler.has_work:
        assert time.monotonic() < deadline, "engine still busy"
        time.sleep(0.02)


# ---- the API through the openai client --------------------------------------------------------
def test_models_health_metrics(srv):
    c = srv.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    text = httpx.get(srv.url + "/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "queue_depth",
                 "decode_batch_size_bucket", "state_pool_slots_used", "time_to_first_token_seconds_bucket",
                 "request_latency_seconds_count", "prefix_cache_bytes"):
        assert f"falcon_mamba_{name}" in text, name


def test_completion_stream_and_not(srv):
    c = srv.client()
    kw = dict(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    full = c.completions.create(**kw)
    ch = full.choices[0]
    assert ch.finish_reason == "length" and ch.text
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens == 5
    pieces, finish = [], None
    for chunk in c.completions.create(stream=True, **kw):
        for cc in chunk.choices:
            pieces.append(cc.text)
            finish = cc.finish_reason or finish
    assert "".join(pieces) == ch.text and finish == "length"
    # Stop strings cut the text before them.
    stop = ch.text[len(ch.text) // 2:][:3]
    cut = c.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == ch.text[:ch.text.index(stop)]


def test_chat_stream_and_not_with_logprobs(srv):
    c = srv.client()
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Say hello."}],
              max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    full = c.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    lps = full.choices[0].logprobs.content
    assert len(lps) == 6
    for t in lps:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob), "greedy takes the top token"
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    text, roles = "", []
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for cc in chunk.choices:
            roles.append(cc.delta.role)
            text += cc.delta.content or ""
    assert text == msg.content and roles[0] == "assistant"
    assert usage.completion_tokens == 6 and usage.prompt_tokens == full.usage.prompt_tokens


def test_n_seed_and_sampling(srv):
    c = srv.client()
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=1.0, top_p=0.9, n=3)
    a = c.completions.create(seed=7, **kw)
    b = c.completions.create(seed=7, **kw)
    other = c.completions.create(seed=8, **kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices], "same seed, same text"
    assert [x.text for x in a.choices] != [x.text for x in other.choices]
    assert len({x.text for x in a.choices}) > 1, "each choice draws from its own generator"
    # Several prompts in one request: choices come per prompt, n each.
    multi = c.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=2, temperature=0, n=2)
    assert [x.index for x in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text != multi.choices[2].text


def test_64_concurrent_clients_each_equal_to_alone(srv):
    """At temperature 0 every one of 64 concurrent requests gets the tokens it gets alone.
    Batched and single-row matmuls may round differently in the last bits; a token may then
    differ only where the two best candidates are within 1e-4 (a near-tie), which is checked."""
    prompts = [f"Client {i} asks about topic number {i * 7 % 64} today" for i in range(64)]
    kw = dict(model="tiny", max_tokens=8, temperature=0, logprobs=2)
    c = srv.client()
    alone = [c.completions.create(prompt=p, **kw).choices[0] for p in prompts]
    wait_idle(srv.engine)
    batches_before = srv.engine.m_batch.counts[:]

    async def one(client, i):
        if i % 2:  # half of them stream
            text, tokens = "", []
            async for chunk in await client.completions.create(prompt=prompts[i], stream=True, **kw):
                for cc in chunk.choices:
                    text += cc.text
                    tokens += cc.logprobs.tokens if cc.logprobs else []
            return text, tokens
        r = (await client.completions.create(prompt=prompts[i], **kw)).choices[0]
        return r.text, r.logprobs.tokens

    async def crowd():
        async with srv.aclient() as client:
            return await asyncio.gather(*[one(client, i) for i in range(64)])

    together = asyncio.run(asyncio.wait_for(crowd(), 120))
    big = sum(n - b for n, b, le in zip(srv.engine.m_batch.counts, batches_before,
                                        [*srv.engine.m_batch.buckets, 1e9]) if le > 16)
    assert big > 0, "the requests were decoded in batches of more than 16"
    for i, (ref, (text, tokens)) in enumerate(zip(alone, together)):
        if tokens == ref.logprobs.tokens:
            assert text == ref.text, i
            continue
        j = next(k for k, (a, b) in enumerate(zip(tokens, ref.logprobs.tokens)) if a != b)
        top = sorted(ref.logprobs.top_logprobs[j].values(), reverse=True)
        assert top[0] - top[1] < 1e-4, f"request {i}: token {j} differs without a near-tie"


# ---- bad requests ---------------------------------------------------------------------------
BAD = [
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": "s"}, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 70000]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("route,body,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_malformed_requests_get_400(srv, route, body, param):
    r = httpx.post(srv.url + route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_other_errors(srv):
    post = lambda route, **kw: httpx.post(srv.url + route, **kw)  # noqa: E731
    r = post("/v1/completions", content=b'{"model": "tiny", "prompt": ')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post("/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400
    r = post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # prompt + max_tokens over the configured limit
    r = post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": MAX_CONTEXT})
    assert r.status_code == 400 and str(MAX_CONTEXT) in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model="tiny", prompt=[5] * MAX_CONTEXT, max_tokens=1)
    # Without max_tokens the default is trimmed to the room left, not refused.
    r = post("/v1/chat/completions", json={"model": "tiny", "temperature": 0, "messages": [
        {"role": "user", "content": "hi " * (MAX_CONTEXT - 60)}]})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= MAX_CONTEXT
    # body size limit, announced or not
    big = json.dumps({"model": "tiny", "prompt": "x" * MAX_BODY}).encode()
    r = post("/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = post("/v1/completions", content=iter([big[:40000], big[40000:]]))  # chunked, no length
    assert r.status_code == 413
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(srv.url + "/health").status_code == 200, "the server survived all that"


# ---- disconnects, a full pool, long prompts --------------------------------------------------
def _cancelled(engine):
    return engine.m_finished.value(reason="cancelled")


def test_disconnect_cancels_and_frees_slots(srv):
    wait_idle(srv.engine)
    before = _cancelled(srv.engine)
    body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 1000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert srv.engine.scheduler.used_slots == 1
    # The client hung up; the request stops well before 3000 tokens.
    wait_idle(srv.engine)
    assert _cancelled(srv.engine) == before + 1 and srv.engine.scheduler.used_slots == 0
    # Non-streaming: the client times out and goes away.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    wait_idle(srv.engine)
    assert _cancelled(srv.engine) == before + 2


def test_full_pool_queues_then_429(small):
    eng = small.engine
    body = {"model": "tiny", "prompt": "Keep going", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    streams = []
    try:
        for _ in range(2):  # take both slots
            cm = httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=30)
            lines = cm.__enter__().iter_lines()
            streams.append((cm, lines))  # keep the iterator: collecting it closes the connection
            next(line for line in lines if line.startswith("data:"))
        assert eng.scheduler.free_slots == 0
        # The third waits in the queue...
        waiter = threading.Thread(target=lambda: httpx.post(
            small.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60))
        waiter.start()
        deadline = time.monotonic() + 10
        while len(eng.scheduler.waiting) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # ...and past the queue's one place: 429 with Retry-After, through the openai client too.
        r = httpx.post(small.url + "/v1/completions", json={**body, "stream": False})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            small.client().chat.completions.create(model="tiny", max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}])
        metrics = httpx.get(small.url + "/metrics").text
        assert "falcon_mamba_queue_depth 1" in metrics and "falcon_mamba_state_pool_slots_used 2" in metrics
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    waiter.join(30)
    assert not waiter.is_alive(), "the queued request was served once slots were freed"
    wait_idle(eng)
    assert eng.scheduler.free_slots == 2


def test_long_prompt_does_not_stall_a_running_stream(small, model_and_tok):
    """The long prompt is read 16 tokens per step while the short stream decodes every step. The
    short stream's tokens are counted (its logprobs list them), not its events: a stream whose
    client falls behind gets several steps' tokens in one event."""
    wait_idle(small.engine)
    tok = model_and_tok[1]
    long_prompt = " ".join(f"word{i}" for i in range(300))
    n_long = len(tok.encode(long_prompt))
    assert n_long >= 600
    events = []

    def short():
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 20, "temperature": 0, "stream": True,
                "ignore_eos": True, "logprobs": 0}
        with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    tokens = len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
                    events.extend([("short", time.monotonic())] * tokens)
                    if events:
                        started.set()

    started = threading.Event()
    t = threading.Thread(target=short)
    t.start()
    assert started.wait(30)
    body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(("long", time.monotonic()))
                break
    t.join(60)
    kinds = [k for k, _ in sorted(events, key=lambda e: e[1])]
    # 20 short tokens take 20 steps; reading the long prompt takes n_long / 16 > 37 steps.
    assert kinds.count("short") >= 20 and kinds[-1] == "long", kinds


# ---- API key -------------------------------------------------------------------------------------
def test_api_key(srv, model_and_tok):
    model, tok = model_and_tok
    keyed = Running(model, tok, api_key="s3cret", engine=srv.engine, drain=False)
    try:
        assert httpx.get(keyed.url + "/health").status_code == 200, "/health needs no key"
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(keyed.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(keyed.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            keyed.client(api_key="wrong").models.list()
        out = keyed.client(api_key="s3cret").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert out.choices[0].finish_reason in ("length", "stop")
    finally:
        keyed.stop()
    assert srv.engine.is_alive, "a front end without drain leaves the shared engine running"
