"""The OpenAI request bodies: validation into engine parameters, and the response JSON.

No HTTP and no model here. Validation is strict on the fields we implement (type, range), refuses
fields whose meaning we do not implement (tools, logit_bias, echo...) rather than silently
ignoring them, and ignores bookkeeping fields (user, metadata, store...). Every problem is an
APIError that the app turns into an OpenAI-style error body:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from falcon_mamba.byte_level import piece_bytes
from falcon_mamba.errors import UserError
from falcon_mamba.sampling import SamplingParams

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_INT = (1 << 31) - 1  # max_tokens, top_k: larger values cannot be computed with anyway


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


# ---- field checks ---------------------------------------------------------------------------
def _short(v) -> str:
    """A value for an error message, never longer than a line (a 4000-digit integer is not)."""
    text = repr(v)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def _int(body: dict, name: str, default, low: int, high: int = MAX_INT):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"'{name}' must be an integer, got {_short(v)}")
    if v < low or v > high:
        raise _bad(name, f"'{name}' must be between {low} and {high}, got {_short(v)}")
    return v


def _text(v: str, param: str) -> str:
    """A string from the body must be Unicode text: JSON may carry a lone surrogate (\\ud800), which
    has no UTF-8 form and cannot be tokenized."""
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad(param, f"'{param}' holds a lone surrogate at character {e.start} (a broken "
                              "\\ud800-\\udfff escape); send valid Unicode text") from None
    return v


def _float(body: dict, name: str, default: float, low: float, high: float, low_open=False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"'{name}' must be a number, got {_short(v)}")
    try:
        v = float(v)
    except OverflowError:  # an integer of hundreds of digits
        raise _bad(name, f"'{name}' must be >= {low} and <= {high}, got {_short(v)}") from None
    if not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a finite number, got {v!r}")
    if v < low or v > high or (low_open and v == low):
        raise _bad(name, f"'{name}' must be {'>' if low_open else '>='} {low} and <= {high}, got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be true or false, got {v!r}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(v)}")
    if any(s == "" for s in v):
        raise _bad("stop", "'stop' strings must not be empty")
    return tuple(_text(s, "stop") for s in v)


def _unsupported(body: dict) -> None:
    """Refuse what would change the answer if we ignored it."""
    checks = {
        "tools": lambda v: bool(v), "functions": lambda v: bool(v),
        "tool_choice": lambda v: v not in (None, "none"), "function_call": lambda v: v not in (None, "none"),
        "logit_bias": lambda v: bool(v), "echo": lambda v: bool(v), "suffix": lambda v: bool(v),
        "presence_penalty": lambda v: v not in (None, 0, 0.0),
        "frequency_penalty": lambda v: v not in (None, 0, 0.0),
        "response_format": lambda v: v not in (None, {"type": "text"}),
        "audio": lambda v: v is not None, "prediction": lambda v: v is not None,
    }
    for name, bad in checks.items():
        if name in body and bad(body[name]):
            raise _bad(name, f"'{name}' is not supported by this server")
    if body.get("best_of") not in (None, body.get("n") or 1):
        raise _bad("best_of", "'best_of' other than n is not supported by this server")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise _bad("modalities", "only the 'text' modality is supported")


@dataclass
class Job:
    """A validated request: what to generate and how to answer."""

    model: str
    prompts: list  # completions: str or list[int] each; chat: one rendered later from messages
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int = 0
    messages: list[dict] | None = None  # chat only
    chat: bool = False
    max_tokens_given: bool = True  # False: the default applies, trimmed to the context limit


def _common(body: dict, default_max_tokens: int, chat: bool) -> tuple[dict, int]:
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required: the id of a model from GET /v1/models")
    _text(model, "model")
    _unsupported(body)
    n = _int(body, "n", 1, 1, MAX_N)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", None, 1)
    else:
        max_tokens = _int(body, "max_tokens", default_max_tokens, 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", f"'seed' must be an integer, got {_short(seed)}")
    stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    include_usage = bool(so and so.get("include_usage"))
    if so and not stream:
        raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    kw = dict(
        max_new_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_int(body, "top_k", 0, 0),  # an extension, as vLLM takes it
        min_p=_float(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        ignore_eos=_bool(body, "ignore_eos", False),
        # Seeds are any integer in the API; the generator wants a non-negative one.
        seed=None if seed is None else seed % (1 << 63),
        stop=_stop(body),
    )
    given = body.get("max_tokens") is not None or (chat and body.get("max_completion_tokens") is not None)
    return {"model": model, "n": n, "stream": stream, "include_usage": include_usage,
            "max_tokens_given": given}, kw


def parse_completion(body: dict, default_max_tokens: int = 16) -> Job:
    common, kw = _common(body, default_max_tokens, chat=False)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad("logprobs", f"'logprobs' must be an integer between 0 and {MAX_LOGPROBS}")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
          and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):
        prompts = [list(p) for p in prompt]
    else:
        raise _bad("prompt", "'prompt' must be a non-empty string, a list of strings, a list of "
                             "token ids or a list of lists of token ids")
    if any(p == "" for p in prompts):
        raise _bad("prompt", "'prompt' must not be empty")
    for p in prompts:
        if isinstance(p, str):
            _text(p, "prompt")
    params = _params(kw, logprobs is not None)
    return Job(prompts=prompts, params=params, top_logprobs=logprobs or 0, **common)


def parse_chat(body: dict, default_max_tokens: int = 1024) -> Job:
    common, kw = _common(body, default_max_tokens, chat=True)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role", f"{where}.role must be system, developer, user or "
                                        f"assistant, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise _bad(f"{where}.content", "only text content parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")
        _text(content, f"{where}.content")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if top and not logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return Job(prompts=[], messages=clean, chat=True, params=_params(kw, logprobs),
               top_logprobs=top, **common)


def _params(kw: dict, logprobs: bool) -> SamplingParams:
    try:
        return SamplingParams(logprobs=logprobs, **kw)
    except UserError as e:
        raise _bad(None, str(e)) from None


# ---- responses -------------------------------------------------------------------------------
class TokenText:
    """Token id -> (text, exact bytes) for logprobs, cached."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tok.id_to_token(token_id) or ""
            # an added/special token (characters outside the byte alphabet) is plain text
            raw = piece_bytes(piece)
            hit = (raw.decode("utf-8", errors="replace"), raw)
            self._cache[token_id] = hit
        return hit


def completion_logprobs(samples, token_text: TokenText, offset: int) -> dict:
    """The legacy completions format for a run of tokens; offset: text offset of the first."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for x in samples:
        text, _ = token_text(x.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(x.logprob)
        out["top_logprobs"].append({token_text(t)[0]: lp for t, lp in (x.top or [])} if x.top else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(samples, token_text: TokenText) -> dict:
    content = []
    for x in samples:
        text, raw = token_text(x.token)
        top = []
        for t, lp in x.top or []:
            tt, tb = token_text(t)
            top.append({"token": tt, "logprob": lp, "bytes": list(tb)})
        content.append({"token": text, "logprob": x.logprob, "bytes": list(raw), "top_logprobs": top})
    return {"content": content}


def finish_reason(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason, reason)
