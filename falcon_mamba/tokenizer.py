"""A thin wrapper over `tokenizers`: tokenizer.json from the model folder, bos/eos, chat template.

The chat template comes from tokenizer_config.json's ``chat_template`` (a Jinja string, as HF
writes it) when the folder has one, as the instruct model's does. Otherwise a documented fallback
is used, plain text with role headers that any base model can continue:

    User: {message}\n\nAssistant: {answer}\n\n ...   (a system message comes first as "System: ...")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from falcon_mamba.errors import UserError
from falcon_mamba.hub import resolve_model_dir

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Tokenizer:
    def __init__(self, tokenizer_json: str | os.PathLike, config: dict | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(tokenizer_json)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: not found; the model folder needs a tokenizer.json") from None
        except Exception as e:
            raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path = path
        config = config or {}
        self.chat_template: str = config.get("chat_template") or FALLBACK_CHAT_TEMPLATE
        self.has_chat_template = bool(config.get("chat_template"))
        self.bos_token_id = self._special_id(config.get("bos_token"), ["<|begin_of_text|>", "<s>"])
        self.eos_token_id = self._special_id(config.get("eos_token"), ["<|endoftext|>", "</s>", "<|im_end|>"])

    def _special_id(self, configured, candidates: list[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
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
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (byte-level BPE), for UTF-8-safe streaming."""
        return self.decode([token_id]).encode("utf-8", errors="surrogatepass")

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render [{"role": ..., "content": ...}, ...] to the prompt text."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError("each chat message needs a 'role' and a 'content'")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise UserError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        try:
            tmpl = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise UserError(f"chat template does not parse ({e})") from None
        special = {"bos_token": "", "eos_token": ""}
        if self.bos_token_id is not None:
            special["bos_token"] = self.id_to_token(self.bos_token_id)
        if self.eos_token_id is not None:
            special["eos_token"] = self.id_to_token(self.eos_token_id)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{tc}: not valid JSON ({e})") from None
    return Tokenizer(tj, config)


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A tokenizer whose ids reach past the model's embedding table cannot be used with it."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                        f"model's vocabulary is {vocab_size}; use the tokenizer saved with the model")
