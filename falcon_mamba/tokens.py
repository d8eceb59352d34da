"""Token ids at the edges of generation: prompt validation and the ids that end a sequence.

Shared by generate() and the serving engine (which generate() runs on), so it imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from falcon_mamba.errors import UserError


def check_token_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> None:
    """UserError unless every id is in [0, vocab_size)."""
    t = torch.as_tensor(ids)
    if t.numel() == 0:
        raise UserError("empty prompt: give at least one token of text")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise UserError(f"token ids must be integers, got {t.dtype}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise UserError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                        "use ids from the model's own tokenizer")


def encode_prompt(tokenizer, prompt: str | Sequence[int], vocab_size: int) -> list[int]:
    """A prompt as text or token ids -> validated token ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise UserError("empty prompt: give at least one character of text")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(-1).tolist()
    else:
        ids = list(prompt)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError("a prompt is a string or a list of integer token ids")
    check_token_ids(ids, vocab_size)
    return ids


def stop_token_ids(tokenizer, model, params) -> set[int]:
    """The ids that end a sequence: params.stop_token_ids plus EOS (unless params.ignore_eos)."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = model.config.eos_token_id
        if eos is not None:
            ids.add(eos)
    return ids
