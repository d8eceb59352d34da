"""A thin wrapper over `tokenizers`: tokenizer.json from the model folder, bos/eos, chat template.

The chat template is the model folder's own (chat_template.jinja, or tokenizer_config.json's
``chat_template``, string or list form), rendered within limits; without one a documented fallback
is used, plain text with role headers that any base model can continue (see chat_template.py):

    User: {message}\n\nAssistant: {answer}\n\n ...   (a system message comes first as "System: ...")

Long texts are tokenized in pieces cut where the tokenizer itself splits (a line break between
non-space characters, checked on the text around the cut), so the tokenizer's per-character
bookkeeping (offsets, strings: ~90 bytes a character) never exists for more than one piece.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from falcon_mamba import chat_template as CT
from falcon_mamba.byte_level import ByteTable, build_table
from falcon_mamba.errors import UserError
from falcon_mamba.hub import resolve_model_dir

FALLBACK_CHAT_TEMPLATE = CT.FALLBACK
PIECE_CHARS = 1 << 16  # text tokenized at once, at most (plus the distance to a safe cut)
_WINDOW = 256  # characters either side of a cut that must tokenize the same cut or not
# A line break between two non-spaces: a whitespace run at the end of a piece would tokenize
# differently (its lookahead sees the end of the text), a single newline does not. Without one
# (text that is a single line), a space between two non-spaces.
_CUTS = (re.compile(r"(?<=\S)\n(?=\S)"), re.compile(r"(?<=\S) (?=\S)"))
_MARKER = "\x00ANSWER\x00"


class Tokenizer:
    def __init__(self, tokenizer_json: str | os.PathLike, config: dict | None = None,
                 template: CT.ChatTemplate | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(tokenizer_json)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: not found; the model folder needs a tokenizer.json") from None
        except Exception as e:
            raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path = path
        self._table, self._table_built, self._table_lock = None, False, threading.Lock()
        config = config or {}
        self.template = template or CT.find_template(None, config)
        self.chat_template: str = self.template.source
        self.has_chat_template = not self.template.is_fallback
        self.bos_token_id = self._special_id(config.get("bos_token"), ["<|begin_of_text|>", "<s>"])
        self.eos_token_id = self._special_id(config.get("eos_token"), ["<|endoftext|>", "</s>", "<|im_end|>"])

    def _special_id(self, configured, candidates: list[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if not isinstance(configured, str):
            configured = None
        for tok in ([configured] if configured else []) + candidates:
            i = self._tok.token_to_id(tok)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """text -> token ids. Special tokens written in the text are recognised as such."""
        check_text(text)
        ids: list[int] = []
        for piece in self._pieces(text):
            ids += self._tok.encode(piece, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def _pieces(self, text: str):
        """text in pieces of about PIECE_CHARS that tokenize, one after the other, exactly as the
        whole text does: each cut is a line break (else a space) between non-spaces, accepted only
        when the text around it tokenizes the same in two parts as in one. Without one: one piece."""
        start = 0
        while len(text) - start > 2 * PIECE_CHARS:
            cut = self._safe_cut(text, start + PIECE_CHARS)
            if cut is None:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _safe_cut(self, text: str, at: int) -> int | None:
        limit = min(len(text), at + PIECE_CHARS)
        for pattern in _CUTS:
            for tried, m in enumerate(pattern.finditer(text, at, limit)):
                if tried == 64:  # a tokenizer that splits elsewhere: try the next kind of cut
                    break
                cut = m.end() if pattern is _CUTS[0] else m.start()
                left, right = text[max(0, cut - _WINDOW):cut], text[cut:cut + _WINDOW]
                whole = self._tok.encode(left + right, add_special_tokens=False).ids
                if whole == (self._tok.encode(left, add_special_tokens=False).ids
                             + self._tok.encode(right, add_special_tokens=False).ids):
                    return cut
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def byte_table(self) -> ByteTable | None:
        """The byte_level.ByteTable of a byte-level BPE tokenizer (None for any other), built on
        first use (~0.2 s for 65k tokens) and kept: the streaming detokenizer's fast path."""
        with self._table_lock:
            if not self._table_built:
                self._table = build_table(self._tok)
                self._table_built = True
        return self._table

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render [{"role": ..., "content": ...}, ...] to the prompt text. UserError (one line naming
        the template problem) when the template fails, loops too long or writes too much."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError("each chat message needs a 'role' and a 'content'")
        special = {"bos_token": "", "eos_token": ""}
        if self.bos_token_id is not None:
            special["bos_token"] = self.id_to_token(self.bos_token_id)
        if self.eos_token_id is not None:
            special["eos_token"] = self.id_to_token(self.eos_token_id)
        return CT.render(self.template, {"messages": messages,
                                         "add_generation_prompt": add_generation_prompt, **special})

    def end_of_turn_stops(self) -> tuple[str, ...]:
        """The text the template writes after an assistant's answer (e.g. "<|im_end|>"), as a stop
        string, so generation ends where the template closes the turn instead of writing the
        user's next turn itself. The fallback's is "\\nUser:"; () when the template cannot say."""
        if self.template.is_fallback:
            return ("\nUser:",)
        try:
            text = self.apply_chat_template(
                [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARKER}],
                add_generation_prompt=False)
        except UserError:  # a template that cannot render this: rely on EOS
            return ()
        closing = text.split(_MARKER, 1)[-1].strip() if _MARKER in text else ""
        return (closing,) if closing else ()

    def describe_chat_template(self) -> str:
        return self.template.describe()


def check_text(text: str, what: str = "the text") -> None:
    """UserError for a string that is not Unicode text: a lone surrogate (from JSON's \\ud800, or
    bytes that were not UTF-8 read with surrogateescape) has no UTF-8 form to tokenize."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                        f"{e.start} (bytes that are not UTF-8?); send UTF-8 text") from None


def load_tokenizer(ref: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json (and tokenizer_config.json if present) from a model folder or Hub id.
    A path to a tokenizer.json file works too."""
    path = Path(ref).expanduser()
    if path.is_file():
        folder, tj = path.parent, path
    else:
        folder = resolve_model_dir(ref)
        tj = folder / "tokenizer.json"
    config = {}
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            config = json.loads(tc.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{tc}: not valid JSON ({e})") from None
        except OSError as e:
            raise UserError(f"{tc}: cannot be read ({e.strerror})") from None
        if not isinstance(config, dict):
            raise UserError(f"{tc}: expected a JSON object")
    return Tokenizer(tj, config, CT.find_template(folder, config))


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A tokenizer whose ids reach past the model's embedding table cannot be used with it."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                        f"model's vocabulary is {vocab_size}; use the tokenizer saved with the model")
