"""The SSE chunk writer (server/sse.py): every chunk is, byte for byte, the json.dumps of the
whole chunk dict that the server wrote before (what tests/test_server.py's `openai` client
parses), over random texts, indices, logprobs and finish reasons, for both routes."""

import json
import random

from falcon_mamba.server.sse import ChunkWriter

PIECES = [" the", "’s", "日本語", "😀", "\n", "\t", "\"", "\\", "\u2028", "\x00", "\x1f", "é", "\ufffd",
          "</script>", "{}", "a" * 50, ""]


def _before(rid, obj, created, model, include_usage, choices, usage=None) -> str:
    """app._sse's chunk before the writer (commit ff2030d)."""
    d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        d["usage"] = usage
    return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"


def _logprobs(rng, chat):
    if chat:
        return {"content": [{"token": rng.choice(PIECES), "logprob": -rng.random() * 9,
                             "bytes": list(rng.choice(PIECES).encode()), "top_logprobs": []}]}
    return {"tokens": [rng.choice(PIECES)], "token_logprobs": [rng.choice([-0.5, float("-inf"), -1e-9])],
            "top_logprobs": [{rng.choice(PIECES): -2.25}], "text_offset": [rng.randrange(100)]}


def test_chunks_equal_json_dumps_of_the_chunk_dict():
    rng = random.Random(3)
    for case in range(2000):
        chat, include_usage = case % 2 == 0, case % 4 < 2
        rid = ("chatcmpl-" if chat else "cmpl-") + f"{rng.getrandbits(96):024x}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = rng.choice(["falcon-mamba-7b", "tiiuae/falcon-mamba-7b", 'we"ird/名前\\'])
        created = rng.randrange(1 << 31)
        w = ChunkWriter(rid, obj, created, model, include_usage, chat)
        idx = rng.randrange(200)
        text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(4)))
        lp = _logprobs(rng, chat) if rng.random() < 0.3 else None
        finish = rng.choice([None, None, "stop", "length"])
        if chat:
            choice = {"index": idx, "delta": {"content": text} if text else {}, "logprobs": lp,
                      "finish_reason": finish}
        else:
            choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": finish}
        want = _before(rid, obj, created, model, include_usage, [choice])
        assert w.choice(idx, text, lp, finish) == want, case
        assert json.loads(want[6:]) == json.loads(w.choice(idx, text, lp, finish)[6:])
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        assert w.chunk([], usage) == _before(rid, obj, created, model, include_usage, [], usage)
