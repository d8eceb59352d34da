"""Byte-level BPE: the GPT-2 byte <-> character map, and a table token id -> raw bytes.

A byte-level BPE vocabulary spells every byte with one visible character (printable bytes stand for
themselves, the others are shifted past 255). Its ByteLevel decoder maps each token's characters
back to bytes, joins the bytes of all tokens and decodes them once as UTF-8 (invalid bytes ->
U+FFFD). So for such a tokenizer decode(ids) is a function of the concatenated bytes alone, and a
stream can be decoded with a table lookup per token and an incremental UTF-8 decoder
(streaming.ByteStreamDetokenizer) instead of calls into the tokenizer.

The table speaks only for what it can prove: ordinary vocabulary tokens whose decode alone equals
the UTF-8 decoding of their table bytes. Added / special tokens, ids outside the vocabulary and any
token that disagrees get None, and the streaming detokenizer asks the tokenizer for those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

REPLACEMENT = "\ufffd"


def bytes_to_unicode() -> dict[int, str]:
    """byte -> its character in the byte-level alphabet (the GPT-2 convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
# str.translate table: an alphabet character -> the character of its byte value (so that latin-1
# encodes it to that byte); a character below 256 that is not in the alphabet -> one that latin-1
# cannot encode (as any character past 255 outside the alphabet is already).
_TO_LATIN1 = {ord(c): chr(b) for c, b in UNICODE_TO_BYTE.items()}
_TO_LATIN1.update({v: "\uffff" for v in range(256) if chr(v) not in UNICODE_TO_BYTE})


def piece_bytes(piece: str) -> bytes:
    """The bytes a ByteLevel decoder makes of one token string: mapped through the alphabet, or
    the string's own UTF-8 when a character is not in it (as the `tokenizers` decoder does)."""
    try:
        return piece.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return piece.encode("utf-8")


@dataclass(frozen=True)
class ByteTable:
    """raw[id]: the token's bytes, or None where the tokenizer must decode it (added / special
    tokens, disagreements). text[id]: the token's text when its bytes are whole UTF-8 on their own
    and do not end in U+FFFD (the case a stream can emit at once), else None. Both are indexed
    by token id up to the tokenizer's vocabulary size; larger ids are not in the table."""

    raw: list[bytes | None]
    text: list[str | None]


def _is_byte_level(decoder_json: dict | None) -> bool:
    """ByteLevel alone, or a Sequence of ByteLevel decoders only: anything else (Strip, Replace,
    Metaspace, WordPiece...) rewrites text across tokens, which a per-token table cannot know."""
    if not decoder_json:
        return False
    if decoder_json.get("type") == "ByteLevel":
        return True
    if decoder_json.get("type") == "Sequence":
        parts = decoder_json.get("decoders") or []
        return bool(parts) and all(_is_byte_level(p) for p in parts)
    return False


def build_table(hf_tokenizer) -> ByteTable | None:
    """The byte table of a `tokenizers.Tokenizer`, or None when its decoder is not byte-level.
    Costs ~0.2 s for a 65k vocabulary (one batched decode checks every entry); build it once."""
    decoder = hf_tokenizer.decoder
    if decoder is None or not _is_byte_level(json.loads(decoder.__getstate__())):
        return None
    vocab = hf_tokenizer.get_vocab(with_added_tokens=False)
    added = set(hf_tokenizer.get_added_tokens_decoder())
    size = max(vocab.values(), default=-1) + 1
    raw: list[bytes | None] = [None] * size
    for piece, i in vocab.items():
        if i not in added:
            raw[i] = piece_bytes(piece)
    # The check that makes the table the tokenizer's own word: each entry's decode, alone.
    ids = [i for i in range(size) if raw[i] is not None]
    for i, alone in zip(ids, hf_tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)):
        if raw[i].decode("utf-8", errors="replace") != alone:
            raw[i] = None
    text: list[str | None] = [None] * size
    for i, b in enumerate(raw):
        if b:
            try:
                t = b.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not t.endswith(REPLACEMENT):
                text[i] = t
    return ByteTable(raw, text)
