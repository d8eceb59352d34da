"""Supervised fine-tuning data: a chat conversation -> token ids and a loss mask on assistant tokens.

A conversation is rendered through the tokenizer's chat template (the model folder's own one, or
the documented fallback). Each assistant message is located as the text the template adds between
"the conversation so far + generation prompt" and "the conversation including that message"; its
tokens (and the eos token that ends the turn) are the only training targets. System and user text,
role headers and the generation prompt are context only.
"""

from __future__ import annotations

from falcon_mamba.errors import UserError
from falcon_mamba.tokenizer import Tokenizer


def encode_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """messages [{"role", "content"}, ...] -> (ids, mask) of equal length; mask[i] = 1 where ids[i]
    is an assistant token the loss should train on."""
    if not isinstance(messages, list) or not messages:
        raise UserError("a chat example needs a non-empty 'messages' list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError("each chat message needs a 'role' and a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("a chat example has no assistant message, so nothing to train on")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the text already turned into ids
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError("the chat template does not render conversations as growing prefixes; "
                            "assistant tokens cannot be located for the loss mask")
        context = tok.encode(prompt[len(done):])
        answer = tok.encode(full[len(prompt):])
        if tok.eos_token_id is not None and (not answer or answer[-1] != tok.eos_token_id):
            answer.append(tok.eos_token_id)  # teach the model to end its turn
        ids += context + answer
        mask += [0] * len(context) + [1] * len(answer)
        done = full
    return ids, mask
