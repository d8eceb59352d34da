"""The HTTP layer: OpenAI-compatible routes over an Engine. No model logic here.

    GET  /health                 200 {"status": "ok"}; 503 while warming up or shutting down; no key
    GET  /metrics                Prometheus text
    GET  /v1/models[/{id}]
    POST /v1/completions         prompt: string | [string] | [int] | [[int]]
    POST /v1/chat/completions    messages rendered with the tokenizer's chat template

Streaming answers are Server-Sent Events in OpenAI's chunk format, ending with ``data: [DONE]``.
A client that disconnects cancels its request, which frees its state slots at the next step.

Nothing a client sends is an HTTP 500: a bad body is a 400 naming the field, a body over the size
limit 413, a body that does not arrive within the body timeout 408, a request that could never be
queued whole (more choices than the server has slots) 400, a full queue 429. Parsing a large body,
validating it, rendering the chat template and tokenizing run on a thread pool, never on the event
loop, so health checks and streams go on while a 15 MiB request is read. An upload the client
abandons is one log line. Should a bug still raise, the client gets a JSON 500 and its keep-alive
connection stays usable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from falcon_mamba.engine.engine import Delta, Engine, QueueFull, ShuttingDown
from falcon_mamba.errors import UserError
from falcon_mamba.server import protocol as P
from falcon_mamba.server.dispatch import dispatcher_for
from falcon_mamba.server.sse import ChunkWriter

log = logging.getLogger("falcon_mamba.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024
PREPARE_THREADS = 4  # the pool that parses, renders templates and tokenizes


class ServerSettings:
    def __init__(self, model_id: str, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
                 default_max_tokens: int = 1024, header_timeout_s: float = 10.0,
                 body_timeout_s: float = 30.0):
        self.model_id = model_id
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.created = int(time.time())


class _ClientGone(Exception):
    """The client closed the connection before its request body was complete."""


class GuardMiddleware:
    """The outermost layer. Starlette re-raises an unhandled exception after sending its 500, and
    uvicorn then closes the connection, so the client's next request on it is reset; here the
    exception (already logged by the app's handler) ends with the response, and the connection
    lives on. Should no response have started, a JSON 500 is sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def send_(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception:
            if scope["type"] != "http" or started:
                return
            log.exception("internal error")
            await _json_error(500, P.error_body("internal server error", type="server_error"))(
                scope, receive, send)


def _json_error(status: int, body: dict, headers: dict | None = None):
    return JSONResponse(body, status_code=status, headers=headers)


class AuthMiddleware:
    """Every route but /health needs ``Authorization: Bearer <key>`` when a key is set."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if given and hmac.compare_digest(given.encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        resp = _json_error(401, P.error_body("Missing or incorrect API key: send 'Authorization: "
                                             "Bearer <key>'", code="invalid_api_key"))
        await resp(scope, receive, send)


async def _read_body(request, limit: int, timeout_s: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise P.APIError(413, f"request body is over this server's limit of {limit} bytes")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.APIError(413, f"request body is over this server's limit of {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise P.APIError(408, f"the request body did not arrive within {timeout_s:g} s "
                              f"({size} bytes received)") from None
    except ClientDisconnect:
        raise _ClientGone() from None
    return b"".join(chunks)


def _parse_json(data: bytes):
    try:
        return json.loads(data)
    except RecursionError:
        raise P.APIError(400, "the request body is nested too deeply to be a request") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise P.APIError(400, f"the request body is not valid JSON ({str(e)[:200]})") from None


def check_fits(engine: Engine, n_prompts: int, n: int) -> None:
    """400, not 429, for a request that could never be queued whole, however long it waited."""
    cfg = engine.config
    if n > cfg.num_slots:
        raise P.APIError(400, f"n={n} is more than this server's {cfg.num_slots} state slots; "
                              "ask for fewer choices", param="n")
    at_once = cfg.num_slots // n  # requests that fit in an idle server's slots
    if n_prompts - at_once > cfg.max_waiting:
        raise P.APIError(400, f"{n_prompts} prompts x n={n} can never be queued at once here "
                              f"({cfg.num_slots} state slots, {cfg.max_waiting} waiting places); "
                              "send fewer prompts per request", param="prompt")


class _Stream:
    """The deltas of one or more engine requests (one per prompt), as an asyncio queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dispatch = dispatcher_for(asyncio.get_running_loop())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs = []

    def sink(self, base: int):
        put, queue = self.dispatch.put, self.queue

        def sink(deltas: list[Delta]) -> None:  # called from the engine thread
            put(queue, (base, deltas))  # a step's sinks share one wake-up of the loop
        return sink

    def submit(self, prompts: list[list[int]], job: P.Job) -> None:
        check_fits(self.engine, len(prompts), job.n)
        try:
            for i, ids in enumerate(prompts):
                params = job.params
                room = self.engine.config.max_context - len(ids)
                if not job.max_tokens_given and 1 <= room < params.max_new_tokens:
                    # No max_tokens asked for: the default, but never past the context limit.
                    params = dataclasses.replace(params, max_new_tokens=room)
                self.reqs.append(self.engine.submit(ids, params, n=job.n, top_logprobs=job.top_logprobs,
                                                    sink=self.sink(i * job.n)))
        except QueueFull as e:
            self.cancel()
            raise P.APIError(429, f"server busy: {e}; retry later", type="rate_limit_error",
                             code="rate_limit_exceeded",
                             headers={"Retry-After": str(self.engine.retry_after())}) from None
        except ShuttingDown as e:
            self.cancel()
            raise P.APIError(503, str(e), type="server_error") from None
        except UserError as e:
            self.cancel()
            raise P.APIError(400, str(e)) from None

    def cancel(self) -> None:
        for r in self.reqs:
            self.engine.cancel(r)

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.reqs)

    async def events(self):
        """Yield (choice index, Delta) until every sequence has finished. Deltas that queued up
        while the client was being served (a busy event loop) are merged per choice, so a stream
        that falls behind catches up with one SSE event instead of one per token."""
        open_ = sum(r.n for r in self.reqs)
        queue = self.queue
        while open_:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if len(batch) == 1 and len(batch[0][1]) == 1:  # a stream that keeps up: nothing to merge
                base, (d,) = batch[0]
                if d.finish_reason is not None:
                    open_ -= 1
                yield base + d.index, d
                continue
            merged: dict[int, Delta] = {}
            for base, deltas in batch:
                for d in deltas:
                    m = merged.get(base + d.index)
                    if m is None:
                        merged[base + d.index] = Delta(d.index, d.text, list(d.token_ids), list(d.logprobs),
                                                       d.finish_reason, d.error)
                    else:
                        m.text += d.text
                        m.token_ids += d.token_ids
                        m.logprobs += d.logprobs
                        m.finish_reason, m.error = d.finish_reason or m.finish_reason, d.error or m.error
            for idx, d in merged.items():
                if d.finish_reason is not None:
                    open_ -= 1
                yield idx, d

    def usage(self) -> dict:
        prompt = sum(r.prompt_len for r in self.reqs)
        gen = sum(len(s.output_ids) for r in self.reqs for s in r.seqs)
        cached = sum(r.num_cached for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen,
                "prompt_tokens_details": {"cached_tokens": cached}}


async def _until_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine, tokenizer, settings: ServerSettings):
    """The FastAPI app; the engine must be started (and is shut down by the caller)."""
    app = FastAPI(title="falcon-mamba", docs_url=None, redoc_url=None, openapi_url=None)
    token_text = P.TokenText(tokenizer)
    pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="falcon-mamba-prepare")
    # The template's end of turn stops a chat answer, as in `falcon-mamba chat`.
    chat_stops = tokenizer.end_of_turn_stops()
    template_header = {"X-Chat-Template": "fallback" if tokenizer.template.is_fallback
                       else Path(tokenizer.template.origin.split(",")[0]).name}
    if tokenizer.template.is_fallback:
        log.warning("chat requests use %s", tokenizer.describe_chat_template())

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    m = engine.metrics
    m_http = m.counter("requests_total", "HTTP requests by route and status code.")

    def route_of(request) -> str:
        # The route's template, not the raw path: a label per distinct URL would grow unbounded.
        r = request.scope.get("route")
        return getattr(r, "path", "other")

    @app.exception_handler(P.APIError)
    async def _api_error(request, e: P.APIError):
        m_http.inc(route=route_of(request), code=e.status)
        return _json_error(e.status, e.body(), e.headers)

    @app.exception_handler(_ClientGone)
    async def _gone(request, e):
        log.info("%s %s: the client closed the connection before sending the whole body",
                 request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(404)
    async def _not_found(request, e):
        return _json_error(404, P.error_body(f"no route {request.method} {request.url.path}",
                                             code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request, e):
        return _json_error(405, P.error_body(f"{request.method} is not allowed on {request.url.path}"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.exception("internal error")
        return _json_error(500, P.error_body("internal server error", type="server_error"))

    @app.get("/health")
    async def health():
        if engine.closing or not engine.is_alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if not engine.ready:  # capturing the decode graphs: requests queue until then
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": settings.created,
                "owned_by": "falcon-mamba"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id)
        return model_card()

    def _check_model(name: str) -> None:
        if name != settings.model_id:
            raise P.APIError(404, f"model {name!r} does not exist; this server serves "
                                  f"{settings.model_id!r}", param="model", code="model_not_found")

    def _tokenize(job: P.Job) -> list[list[int]]:
        """Template + tokenizer (on the pool: a template may take a while, a long prompt too)."""
        vocab = engine.model.config.vocab_size
        if job.chat:
            try:
                prompts = [tokenizer.apply_chat_template(job.messages, add_generation_prompt=True)]
            except UserError as e:
                raise P.APIError(400, str(e), param="messages") from None
        else:
            prompts = job.prompts
        out = []
        for p in prompts:
            if isinstance(p, str):
                try:
                    ids = tokenizer.encode(p)
                except UserError as e:
                    raise P.APIError(400, str(e), param="prompt") from None
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise P.APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                ids = p
            if not ids:
                raise P.APIError(400, "the prompt is empty after tokenization", param="prompt")
            out.append(ids)
        return out

    def _prepare(data: bytes, chat: bool):
        """The request body -> (job, prompt ids): parse, validate, render, tokenize."""
        body = _parse_json(data)
        job = (P.parse_chat(body, settings.default_max_tokens) if chat
               else P.parse_completion(body, min(16, settings.default_max_tokens)))
        _check_model(job.model)
        check_fits(engine, 1 if chat else len(job.prompts), job.n)  # before the work of tokenizing
        if chat and chat_stops:
            job.params = dataclasses.replace(job.params, stop=tuple(job.params.stop) + chat_stops)
        return job, _tokenize(job)

    async def _handle(request: Request, chat: bool):
        data = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        job, prompts = await off_loop(_prepare, data, chat)
        stream = _Stream(engine)
        stream.submit(prompts, job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        route = route_of(request)
        headers = template_header if chat else {}
        if job.stream:
            m_http.inc(route=route, code=200)
            return StreamingResponse(_sse(stream, job, rid, created, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **headers})
        result = await _collect(request, stream, job, rid, created, chat)
        m_http.inc(route=route, code=200)
        return result if isinstance(result, Response) else JSONResponse(result, headers=headers)

    async def _collect(request, stream: _Stream, job: P.Job, rid, created, chat):
        choices: dict[int, dict] = {}
        watcher = asyncio.ensure_future(_until_disconnect(request))

        async def gather():
            async for idx, d in stream.events():
                c = choices.setdefault(idx, {"text": "", "samples": [], "finish": None})
                c["text"] += d.text
                c["samples"] += d.logprobs
                if d.finish_reason is not None:
                    c["finish"] = d.finish_reason

        task = asyncio.ensure_future(gather())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # the client went away (or the server is stopping the handler)
                task.cancel()
                stream.cancel()
            watcher.cancel()
        if not task.done() or task.cancelled():
            return JSONResponse(P.error_body("client disconnected"), status_code=499)
        task.result()
        bad = [c["finish"] for c in choices.values() if c["finish"] not in ("stop", "length")]
        if "cancelled" in bad:
            raise P.APIError(503, "the request was cancelled: the server is shutting down",
                             type="server_error")
        if bad:
            raise P.APIError(500, "the request failed: internal error", type="server_error")
        out = []
        for idx in sorted(choices):
            c = choices[idx]
            lp = None
            if job.params.logprobs:
                lp = (P.chat_logprobs(c["samples"], token_text) if chat
                      else P.completion_logprobs(c["samples"], token_text, 0))
            if chat:
                out.append({"index": idx, "message": {"role": "assistant", "content": c["text"]},
                            "logprobs": lp, "finish_reason": c["finish"]})
            else:
                out.append({"index": idx, "text": c["text"], "logprobs": lp, "finish_reason": c["finish"]})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": settings.model_id, "choices": out, "usage": stream.usage(),
                "system_fingerprint": None}

    async def _sse(stream: _Stream, job: P.Job, rid, created, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"
        w = ChunkWriter(rid, obj, created, settings.model_id, job.include_usage, chat)
        logprobs = job.params.logprobs
        offsets: dict[int, int] = {}
        try:
            if chat:  # OpenAI opens each choice with its role
                yield w.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}
                               for i in range(len(stream.reqs) * job.n)])
            async for idx, d in stream.events():
                if d.finish_reason in ("cancelled", "error"):
                    msg = ("the request was cancelled: the server is shutting down"
                           if d.finish_reason == "cancelled" else "internal error")
                    yield f"data: {json.dumps(P.error_body(msg, type='server_error'))}\n\n"
                    stream.cancel()
                    break
                if not d.text and not d.finish_reason and not (logprobs and d.logprobs):
                    continue
                lp = None
                if chat:
                    if logprobs:
                        lp = P.chat_logprobs(d.logprobs, token_text)
                else:
                    off = offsets.get(idx, 0)
                    if logprobs:
                        lp = P.completion_logprobs(d.logprobs, token_text, off)
                    offsets[idx] = off + len(d.text)
                yield w.choice(idx, d.text, lp, d.finish_reason)
            else:
                if job.include_usage:
                    yield w.chunk([], stream.usage())
            yield "data: [DONE]\n\n"
        finally:
            # Normal end: nothing to cancel. Client gone (the task is cancelled): free the slots.
            if not stream.done:
                stream.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request, chat=True)

    return GuardMiddleware(AuthMiddleware(app, settings.api_key))
