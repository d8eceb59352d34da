"""Supervised fine-tuning data: an example -> token ids and a loss mask on the answer's tokens.

Accepted jsonl examples (one per line), as TRL and the common datasets write them:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}   ShareGPT
    {"prompt": [messages...], "completion": [messages...]}     loss on the completion's messages only
    {"prompt": "text", "completion": "text"}            plain text: no template, loss on the completion

A conversation is rendered through the tokenizer's chat template (the model folder's own one, or
the documented fallback). Each trained assistant message is located as the text the template adds
between "the conversation so far + generation prompt" and "the conversation including that
message"; its tokens and the EOS that ends the turn are the training targets. When the template
closes the turn with EOS itself (e.g. ``<|im_end|>\\n``), that EOS is the one trained and what
follows it (the newline) is context: no second EOS is added. System and user text, role headers
and the generation prompt are context only.
"""

from __future__ import annotations

from dataclasses import dataclass

from falcon_mamba.errors import UserError
from falcon_mamba.tokenizer import Tokenizer

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system"}
FORMATS = "'messages', ShareGPT 'conversations', or 'prompt' + 'completion'"


@dataclass
class Example:
    messages: list[dict] | None = None  # a conversation, rendered by the template
    train_from: int = 0  # only assistant messages at this index or later are trained
    prompt: str | None = None  # plain prompt/completion text (no template)
    completion: str | None = None


def _check_messages(msgs, what: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{what} must be a non-empty list of {{role, content}} messages")
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)):
            raise UserError(f"each message of {what} needs a string 'role' and a string 'content'")
    return msgs


def parse_example(obj) -> Example:
    """One parsed jsonl line -> Example; UserError naming the accepted formats otherwise."""
    if not isinstance(obj, dict):
        raise UserError(f"a chat example must be a JSON object with {FORMATS}")
    if "messages" in obj:
        return Example(messages=_check_messages(obj["messages"], "'messages'"))
    if "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list) or not conv:
            raise UserError("'conversations' must be a non-empty list of {from, value} turns")
        msgs = []
        for turn in conv:
            if isinstance(turn, dict) and "from" in turn:
                role = _SHAREGPT_ROLES.get(str(turn.get("from")).lower())
                if role is None or not isinstance(turn.get("value"), str):
                    raise UserError(f"a ShareGPT turn needs 'from' ({', '.join(_SHAREGPT_ROLES)}) and a "
                                    f"string 'value', got {str(turn)[:80]}")
                msgs.append({"role": role, "content": turn["value"]})
            else:
                msgs.append(turn)
        return Example(messages=_check_messages(msgs, "'conversations'"))
    if "prompt" in obj and "completion" in obj:
        p, c = obj["prompt"], obj["completion"]
        if isinstance(p, str) and isinstance(c, str):
            if not c:
                raise UserError("'completion' is empty: nothing to train on")
            return Example(prompt=p, completion=c)
        if isinstance(p, list) and isinstance(c, list):
            p, c = _check_messages(p, "'prompt'"), _check_messages(c, "'completion'")
            return Example(messages=p + c, train_from=len(p))
        raise UserError("'prompt' and 'completion' must both be strings or both lists of messages")
    found = ", ".join(map(repr, list(obj)[:5])) or "no fields"
    raise UserError(f"a chat example needs {FORMATS}; found {found}")


def encode_example(tok: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    if ex.messages is not None:
        return encode_chat(tok, ex.messages, ex.train_from)
    context = tok.encode(ex.prompt) if ex.prompt else []
    answer = tok.encode(ex.completion)
    if tok.eos_token_id is not None:
        answer.append(tok.eos_token_id)
    return context + answer, [0] * len(context) + [1] * len(answer)


def _split_answer(tok: Tokenizer, answer: list[int]) -> tuple[list[int], list[int]]:
    """(trained part ending with EOS, context after it). The template's own EOS, when it closes
    the turn with one, is kept; otherwise EOS is added."""
    eos = tok.eos_token_id
    if eos is None:
        return answer, []
    if eos in answer:
        end = len(answer) - answer[::-1].index(eos)  # after the last EOS: the template's closing
        return answer[:end], answer[end:]
    return answer + [eos], []


def encode_chat(tok: Tokenizer, messages: list[dict], train_from: int = 0) -> tuple[list[int], list[int]]:
    """messages [{"role", "content"}, ...] -> (ids, mask) of equal length; mask[i] = 1 where ids[i]
    is an assistant token (of a message at index >= train_from) the loss should train on."""
    if not isinstance(messages, list) or not messages:
        raise UserError("a chat example needs a non-empty 'messages' list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError("each chat message needs a 'role' and a string 'content'")
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if not trained:
        raise UserError("a chat example has no assistant message to train on")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the text already turned into ids
    for i in trained:
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError("the chat template does not render conversations as growing prefixes; "
                            "assistant tokens cannot be located for the loss mask")
        context = tok.encode(prompt[len(done):])
        answer, after = _split_answer(tok, tok.encode(full[len(prompt):]))
        ids += context + answer + after
        mask += [0] * len(context) + [1] * len(answer) + [0] * len(after)
        done = full
    return ids, mask
