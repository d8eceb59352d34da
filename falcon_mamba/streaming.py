"""Text from a stream of tokens, piece by piece: never a split UTF-8 character, never a stop string.

IncrementalDetokenizer: byte-level BPE tokens can end in the middle of a multi-byte character (an
emoji is often 3-4 tokens). Decoding a token alone then gives U+FFFD. So we decode a small window
of recent tokens twice, without and with the new ones, and emit the difference only once it no
longer ends in U+FFFD. The window also carries a few tokens of context, so decoders that treat the
first token specially (e.g. strip a leading space) see the same text as a decode of everything.

StopMatcher: emits text while holding back any tail that could still grow into a stop string, and
cuts the text before the first stop string found.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6  # prompt tokens kept as decoding context for the first pieces


class IncrementalDetokenizer:
    """push(token_id) -> the new text it completes ('' while a character is incomplete);
    flush() -> whatever is left at the end. The pieces joined equal decode(all new tokens) for
    byte-level tokenizers. Memory stays bounded: only the current window of ids is kept."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(context_ids)[-_CONTEXT_TOKENS:]
        self.prefix = 0  # ids[prefix:read] is already-emitted text kept as context
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        piece = after[len(before):]
        # Keep only the ids just emitted as the context for the next piece.
        del self.ids[:self.read]
        self.prefix, self.read = 0, len(self.ids)
        return piece

    def flush(self) -> str:
        """The text of ids not emitted yet (possibly with U+FFFD if the stream ended mid-char)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        del self.ids[:self.read]
        self.prefix, self.read = 0, len(self.ids)
        return after[len(before):]


class StopMatcher:
    """push(text) -> (text safe to emit, matched). After a match, the emitted text ends right
    before the stop string and nothing more should be pushed."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held-back tail at the end of the generation (it never became a stop string)."""
        out, self.pending = self.pending, ""
        return out
