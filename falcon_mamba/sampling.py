"""Sampling parameters: what a request asks for, validated once at the edge.

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1)

The draw itself is ops/sample.py (``sample_rows``: a Triton kernel inside the decode graph on a GPU,
its torch twin on the CPU), in the order HF transformers uses: repetition penalty, temperature,
top-k, top-p and min-p filtering, then a draw. Temperature 0 means greedy (argmax after the penalty).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from falcon_mamba.errors import UserError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next tokens and when to stop. Validated on construction (UserError).

    max_new_tokens      upper bound on generated tokens (0: only read the prompt)
    temperature         0 = greedy; otherwise logits / temperature
    top_k               keep the k most likely tokens (0 = off)
    top_p               keep the smallest set of tokens whose probability reaches top_p (1 = off)
    min_p               drop tokens less likely than min_p * the top token's probability (0 = off)
    repetition_penalty  > 1 discourages tokens already seen (prompt and output), as in CTRL/HF
    seed                same seed, same output (on the same device); None draws a random one
    stop                strings that end the generation; the returned text stops before them
    stop_token_ids      token ids that end the generation (the tokenizer's EOS is added by
                        generate unless ignore_eos)
    logprobs            also return the log-probability of each chosen token under the model's
                        distribution (log_softmax of the raw logits, before penalty/temperature)
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 0, "use 0 or more")
        _check_int("top_k", self.top_k, 0, "use 0 (off) or a positive k")
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        _check_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0 (1 turns it off), got "
                            f"{self.repetition_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "use a non-negative integer")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise UserError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        for i in ids:
            _check_int("stop_token_ids entry", i, 0, "use token ids of the vocabulary")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value, low: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise UserError(f"{name} must be >= {low}, got {value}; {fix}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")


def random_seed() -> int:
    """A fresh seed for runs that did not ask for one (reported back so they can be repeated)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
