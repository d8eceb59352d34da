"""One stream's Server-Sent Events in OpenAI's chunk format, rendered cheaply.

Every chunk of a stream repeats the same id, object, created and model; only a choice's index,
text, logprobs and finish_reason vary. So the constant head and tail are rendered once per stream
and a chunk json-encodes only the varying fields: the same text, byte for byte, that json.dumps
(ensure_ascii=False) of the whole dict gives, at a fraction of the time (the event loop writes one
chunk per stream per engine step, and shares the interpreter lock with the engine thread).

    w = ChunkWriter(rid, "text_completion", created, model_id, include_usage=False, chat=False)
    w.choice(0, " hello", None, None)  # 'data: {"id": ..., "choices": [{"index": 0, "text": ...}]}\\n\\n'
    w.chunk([...], usage)              # any other chunk (the role opener, the usage chunk)
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False), C-accelerated


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


class ChunkWriter:
    def __init__(self, rid: str, obj: str, created: int, model: str, include_usage: bool, chat: bool):
        self.rid, self.obj, self.created, self.model = rid, obj, created, model
        self.include_usage, self.chat = include_usage, chat
        # '{"id": ..., "model": ..., "choices": []}' ("choices" last): cut where the choice goes
        head = _dumps({"id": rid, "object": obj, "created": created, "model": model, "choices": []})
        self._head = "data: " + head[:-2] + '{"index": '
        self._tail = "}]" + (', "usage": null' if include_usage else "") + "}\n\n"
        self._text_key = ', "delta": {"content": ' if chat else ', "text": '

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
        """The chunk of one choice: a completion's {"index", "text", "logprobs", "finish_reason"},
        or a chat's {"index", "delta": {"content": text} (or {} without text), "logprobs",
        "finish_reason"}."""
        if self.chat and not text:
            body = ', "delta": {}'
        elif self.chat:
            body = self._text_key + encode_basestring(text) + "}"
        else:
            body = self._text_key + encode_basestring(text)
        lp = "null" if logprobs is None else _dumps(logprobs)
        fr = "null" if finish_reason is None else encode_basestring(finish_reason)
        return f'{self._head}{index}{body}, "logprobs": {lp}, "finish_reason": {fr}{self._tail}'

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """Any chunk, from its choices as dicts (and the usage when the stream includes it)."""
        d = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model,
             "choices": choices}
        if self.include_usage:
            d["usage"] = usage
        return f"data: {_dumps(d)}\n\n"
