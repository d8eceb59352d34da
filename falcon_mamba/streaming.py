"""Text from a stream of tokens, piece by piece: never a split UTF-8 character, never a stop string.

make_detokenizer(tokenizer, context_ids) picks one of two detokenizers with one contract: push(id)
returns the text a token completes ('' while a character is incomplete), flush() what is left at
the end, and the pieces joined equal tokenizer.decode(all pushed ids).

IncrementalDetokenizer: byte-level BPE tokens can end in the middle of a multi-byte character (an
emoji is often 3-4 tokens). Decoding a token alone then gives U+FFFD. So we decode a small window
of recent tokens twice, without and with the new ones, and emit the difference only once it no
longer ends in U+FFFD. The window also carries a few tokens of context, so decoders that treat the
first token specially (e.g. strip a leading space) see the same text as a decode of everything.
Two tokenizer calls per token: the path of any tokenizer.

ByteStreamDetokenizer: for a byte-level tokenizer (byte_level.py), a table lookup per token and an
incremental UTF-8 decode of its few bytes; the same pieces as the window path, at a fraction of the
host time (the engine thread detokenizes every row of every step). Tokens the table does not speak
for (added / special ones) go through the window path.

StopMatcher: emits text while holding back any tail that could still grow into a stop string, and
cuts the text before the first stop string found.
"""

from __future__ import annotations

from codecs import utf_8_decode
from collections.abc import Sequence

from falcon_mamba.byte_level import REPLACEMENT, ByteTable

_CONTEXT_TOKENS = 6  # prompt tokens kept as decoding context for the first pieces


class IncrementalDetokenizer:
    """push(token_id) -> the new text it completes ('' while a character is incomplete);
    flush() -> whatever is left at the end. The pieces joined equal decode(all new tokens) for
    byte-level tokenizers. Memory stays bounded: only the current window of ids is kept.
    context_ids: already-emitted ids (the prompt's last few are kept); pending_ids: ids pushed but
    not emitted yet (a ByteStreamDetokenizer handing over its held tokens)."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), pending_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(context_ids)[-_CONTEXT_TOKENS:]
        self.prefix = 0  # ids[prefix:read] is already-emitted text kept as context
        self.read = len(self.ids)
        self.ids += pending_ids

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


class ByteStreamDetokenizer:
    """IncrementalDetokenizer's pieces for a byte-level tokenizer, without calling it per token.

    The ByteLevel decoder has no first-token rule: decode(ids) is the UTF-8 decoding (invalid
    bytes -> U+FFFD) of the tokens' bytes joined, so the stream starts fresh (no prompt context)
    and decode(new ids) is what the pieces join to. A piece goes out when the bytes so far end on
    a whole character and the text does not end in U+FFFD, the window path's rule, so pieces (and
    the token at which a stop string is seen) fall where they did."""

    def __init__(self, tokenizer, table: ByteTable):
        self.tok = tokenizer
        self.raw, self.text, self.size = table.raw, table.text, len(table.raw)
        self._reset()

    def _reset(self) -> None:
        self.clean = True  # nothing held back: a token whose text is whole goes out as it is
        self.pend = b""  # the bytes of an unfinished character
        self.held = ""  # text held back: bytes pending, or it ends in U+FFFD
        self.held_ids: list[int] = []  # the ids since the last piece
        self.window: IncrementalDetokenizer | None = None  # while a token the table lacks is held

    def push(self, token_id: int) -> str:
        if self.clean and 0 <= token_id < self.size:
            t = self.text[token_id]
            if t is not None:
                return t
        return self._push(token_id)

    def _push(self, token_id: int) -> str:
        raw = self.raw[token_id] if 0 <= token_id < self.size else None
        if raw is None or self.window is not None:
            return self._push_window(token_id)
        data = self.pend + raw if self.pend else raw
        text, used = utf_8_decode(data, "replace", False)  # an unfinished character is not used
        self.pend = data[used:]
        held = self.held + text
        self.held_ids.append(token_id)
        if self.pend or not held or held.endswith(REPLACEMENT):
            self.held, self.clean = held, False
            return ""
        self._reset()
        return held

    def _push_window(self, token_id: int) -> str:
        if self.window is None:  # the tokenizer decodes the held ids and this one, as before
            self.window = IncrementalDetokenizer(self.tok, pending_ids=self.held_ids)
        piece = self.window.push(token_id)
        if piece:
            self._reset()  # everything pushed is out: back to the table
        else:
            self.clean = False
        return piece

    def flush(self) -> str:
        """The text of ids not emitted yet (U+FFFD for a character the stream ended inside)."""
        if self.window is not None:
            out = self.window.flush()
        else:
            out = self.held + utf_8_decode(self.pend, "replace", True)[0]
        self._reset()
        return out


def make_detokenizer(tokenizer, context_ids: Sequence[int] = ()):
    """The byte-table detokenizer where the tokenizer has a byte table (``tokenizer.byte_table``,
    built once per tokenizer), else the two-decode window path. context_ids: the prompt's ids."""
    table = getattr(tokenizer, "byte_table", None)
    if table is not None:
        return ByteStreamDetokenizer(tokenizer, table)
    return IncrementalDetokenizer(tokenizer, context_ids)


class StopMatcher:
    """push(text) -> (text safe to emit, matched). After a match, the emitted text ends right
    before the stop string and nothing more should be pushed."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        # Every proper prefix of every stop string, by its last character, longest first: the text
        # can only end with one that ends with the text's last character.
        by_end: dict[str, set[str]] = {}
        for s in self.stops:
            for k in range(1, len(s)):
                by_end.setdefault(s[k - 1], set()).add(s[:k])
        self._prefixes = {c: sorted(ps, key=len, reverse=True) for c, ps in by_end.items()}

    def push(self, text: str) -> tuple[str, bool]:
        if self.pending:
            text, self.pending = self.pending + text, ""
        if not self.stops:
            return text, False
        cut = -1
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            return text[:cut], True
        # Hold back the longest tail that could still grow into a stop string.
        for p in self._prefixes.get(text[-1:], ()):
            if text.endswith(p):
                self.pending = p
                return text[:-len(p)], False
        return text, False

    def flush(self) -> str:
        """The held-back tail at the end of the generation (it never became a stop string)."""
        out, self.pending = self.pending, ""
        return out
