"""Perplexity and bits per byte of text, in constant memory.

The text is read in blocks (cut at line breaks), each block tokenized on its own, and the tokens
scored in chunks of ``chunk_size`` with the recurrent state carried from chunk to chunk: memory
depends on the block and chunk sizes, never on the length of the file. Every token of the text is
predicted once, with the whole text before it as context; the first one from a prefix token (BOS,
or EOS where the tokenizer has no BOS, as lm-evaluation-harness does).

    nll  = - sum over tokens of ln p(token | everything before)          (nats)
    ppl  = exp(nll / tokens)
    bpb  = nll / ln 2 / UTF-8 bytes of the text      (comparable across tokenizers)

Legend: L chunk length, V vocab.
"""

from __future__ import annotations

import codecs
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from falcon_mamba.errors import UserError

DEFAULT_CHUNK_SIZE = 1024
BLOCK_BYTES = 1 << 20  # text read (and tokenized) per block


@dataclass
class PerplexityResult:
    name: str
    tokens: int
    bytes: int
    nll: float  # total negative log-likelihood, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def prefix_token_id(tokenizer, model) -> int:
    """The token every text is conditioned on: BOS, else EOS (the document separator)."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                model.config.bos_token_id, model.config.eos_token_id):
        if tid is not None:
            return tid
    raise UserError("the tokenizer has neither a BOS nor an EOS token to start the text with")


class NLLScorer:
    """Feeds a token stream through the model chunk by chunk and sums -ln p(token).

    ``feed`` takes tokens in any amounts; a chunk runs as soon as ``chunk_size`` are pending, and
    ``finish`` runs the rest. Only the (1, V) logits of the last position and the fixed-size state
    are kept between chunks."""

    def __init__(self, model, prefix_token: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 on_chunk: Callable[[int], None] | None = None):
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise UserError(f"chunk size must be a positive integer, got {chunk_size!r}")
        self.model = model
        self.on_chunk = on_chunk  # called with the number of tokens scored, after each chunk
        self.chunk_size = chunk_size
        self.nll = 0.0
        self.tokens = 0
        self._pending: list[int] = []
        with torch.no_grad():
            ids = torch.tensor([[prefix_token]], device=model.device)
            logits, self._state = model(ids)
        self._last = logits[:, -1]  # (1, V): predicts the next token

    def feed(self, ids: list[int]) -> None:
        self._pending.extend(ids)
        while len(self._pending) >= self.chunk_size:
            chunk, self._pending = self._pending[:self.chunk_size], self._pending[self.chunk_size:]
            self._run(chunk)

    def finish(self) -> None:
        if self._pending:
            chunk, self._pending = self._pending, []
            self._run(chunk)

    @torch.no_grad()
    def _run(self, chunk: list[int]) -> None:
        V = self.model.config.vocab_size
        if max(chunk) >= V or min(chunk) < 0:
            raise UserError(f"token ids outside the model's vocabulary ({V}); use the tokenizer saved "
                            "with the model")
        ids_1L = torch.tensor([chunk], device=self.model.device)
        logits_1LV, self._state = self.model(ids_1L, state=self._state)
        # Position t's logits predict token t+1; the first token is predicted by the previous chunk.
        preds_LV = torch.cat([self._last, logits_1LV[0, :-1]])
        self.nll += F.cross_entropy(preds_LV, ids_1L[0], reduction="sum").item()
        self.tokens += len(chunk)
        self._last = logits_1LV[:, -1]
        if self.on_chunk is not None:
            self.on_chunk(len(chunk))


_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _last_safe_cut(text: str) -> int:
    """The position after the last line break between two non-spaces: byte-level tokenizers split
    there (a whitespace run at a block's end would tokenize differently: its lookahead sees the
    end of the text), so the blocks' tokens are the whole text's. 0 if there is none."""
    last = 0
    for m in _SAFE_CUT.finditer(text, max(0, len(text) - (1 << 16))):
        last = m.end()
    if last == 0:
        for m in _SAFE_CUT.finditer(text):
            last = m.end()
    return last


def iter_text_blocks(path: str | os.PathLike, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, int]]:
    """(text, its UTF-8 byte count) blocks of a file, each ending at a line break before a
    non-space (where tokenizers split) where possible.
    UserError if the file is missing, empty, or not UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; give a text file with something to score")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(block_bytes)
            final = not raw
            if b"\x00" in raw:
                raise UserError(f"{path}: not a text file (it holds NUL bytes); give UTF-8 text")
            try:
                text = carry + decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start} of a block); "
                                "give a UTF-8 text file") from None
            if final:
                if text:
                    yield text, len(text.encode("utf-8"))
                return
            cut = _last_safe_cut(text)
            if cut == 0:  # no safe cut: read on (bounded), then cut anyway
                if len(text) < 8 * block_bytes:
                    carry = text
                    continue
                cut = len(text)
            carry = text[cut:]
            yield text[:cut], len(text[:cut].encode("utf-8"))


def score_blocks(model, tokenizer, blocks, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 on_bytes: Callable[[float], None] | None = None) -> PerplexityResult:
    """Score (text, bytes) blocks as one document. on_bytes(n) reports progress in text bytes,
    after each chunk (a block's bytes spread evenly over its tokens)."""
    fifo: list[list[float]] = []  # [tokens not yet scored, bytes per token] of each fed block

    def on_chunk(n: int) -> None:
        done = 0.0
        while n and fifo:
            take = min(n, fifo[0][0])
            done += take * fifo[0][1]
            fifo[0][0] -= take
            n -= take
            if fifo[0][0] == 0:
                fifo.pop(0)
        on_bytes(done)

    scorer = NLLScorer(model, prefix_token_id(tokenizer, model), chunk_size,
                       on_chunk if on_bytes is not None else None)
    n_bytes = 0
    for text, nb in blocks:
        ids = tokenizer.encode(text)
        if ids:
            fifo.append([len(ids), nb / len(ids)])
        scorer.feed(ids)
        n_bytes += nb
    scorer.finish()
    if scorer.tokens == 0:
        raise UserError(f"{name}: no tokens to score")
    return PerplexityResult(name=name, tokens=scorer.tokens, bytes=n_bytes, nll=scorer.nll)


def perplexity_text(model, tokenizer, text: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    name: str = "<text>") -> PerplexityResult:
    """Perplexity and bits per byte of one string (scored as one document)."""
    if not text:
        raise UserError(f"{name}: empty text")
    return score_blocks(model, tokenizer, [(text, len(text.encode("utf-8")))], name, chunk_size)


def perplexity_file(model, tokenizer, path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    progress: bool = False) -> PerplexityResult:
    """Perplexity and bits per byte of a UTF-8 text file (scored as one document)."""
    blocks = iter_text_blocks(path)
    first = next(blocks)  # validates the file (missing, empty, not text) before any model work
    blocks = _chain(first, blocks)
    if not progress:
        return score_blocks(model, tokenizer, blocks, str(path), chunk_size)
    from tqdm import tqdm

    with tqdm(total=Path(path).stat().st_size, unit="B", unit_scale=True, desc=Path(path).name) as bar:
        return score_blocks(model, tokenizer, blocks, str(path), chunk_size, on_bytes=bar.update)


def _chain(first, rest):
    yield first
    yield from rest
