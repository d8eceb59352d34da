"""Sampling: pure functions from next-token logits to token ids.

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    gens = make_generators(params.seed, batch_size, logits_BV.device)   # one per row
    tokens_B = sample(logits_BV, params, gens, prev_tokens)            # or one params per row
    logprobs_B = token_logprobs(logits_BV, tokens_B)

The order of the steps is the one HF transformers uses: repetition penalty, then temperature, then
top-k, top-p and min-p filtering, then a draw. Temperature 0 means greedy (argmax after the penalty).
Each row draws only from its own generator, so a row's tokens do not depend on the other rows.
Nothing here holds state: the caller keeps the generators and the tokens seen so far.

Legend: B batch, V vocab, S the sampled (non-greedy) rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def make_generators(seed: int, batch_size: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row; row i is seeded with seed + i, so row i of a batch draws exactly what
    a batch of one seeded with seed + i draws."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(batch_size)]


def presence_mask(prev_tokens, batch_size: int, vocab_size: int, device) -> torch.Tensor:
    """prev_tokens as a (B, V) bool tensor (returned as is) or B sequences of token ids -> (B, V)
    bool, True where the row has seen the token."""
    if isinstance(prev_tokens, torch.Tensor) and prev_tokens.dtype == torch.bool:
        assert prev_tokens.shape == (batch_size, vocab_size), prev_tokens.shape
        return prev_tokens.to(device)
    if len(prev_tokens) != batch_size:
        raise UserError(f"prev_tokens has {len(prev_tokens)} rows for a batch of {batch_size}")
    seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
    for b, toks in enumerate(prev_tokens):
        t = torch.as_tensor(toks, dtype=torch.long, device=device).reshape(-1)
        if t.numel():
            seen[b, t] = True
    return seen


def _per_row(params: SamplingParams | Sequence[SamplingParams], batch_size: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch_size
    params = list(params)
    if len(params) != batch_size:
        raise UserError(f"got {len(params)} SamplingParams for a batch of {batch_size}")
    return params


def apply_repetition_penalty(logits_BV: torch.Tensor, penalty_B: torch.Tensor,
                             seen_BV: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty: a seen token's positive logit is divided by the penalty, a negative one
    multiplied, so a penalty > 1 always makes it less likely."""
    p = penalty_B[:, None].to(logits_BV.dtype)
    penalized = torch.where(logits_BV > 0, logits_BV / p, logits_BV * p)
    return torch.where(seen_BV, penalized, logits_BV)


# top-k / top-p look at the highest logits first (torch.topk, a partial sort), CANDIDATES at a
# time: a row is sorted whole only where the kept set may reach past the last stage (top-k above it,
# or a nucleus holding more mass). A full sort of 65k logits costs ~7 ms a row on a CPU core, a
# top-64 ~0.2 ms.
CANDIDATES = (64, 1024)


def _mask_sorted(sorted_x: torch.Tensor, top_k_S: torch.Tensor, top_p_S: torch.Tensor,
                 lse_rest: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k then top-p on logits sorted in descending order (S, C). The top-p masses are normalised
    over the top-k survivors among these C; lse_rest (S,), where given, replaces that normaliser for
    rows without top-k (the log-sum-exp of the whole row, when these are only its head). Returns the
    sorted logits with the dropped ones -inf."""
    C = sorted_x.shape[-1]
    rank = torch.arange(C, device=sorted_x.device)
    k = torch.where(top_k_S > 0, top_k_S, C)
    sorted_x = sorted_x.masked_fill(rank[None, :] >= k[:, None], -math.inf)
    lse = sorted_x.logsumexp(-1)
    if lse_rest is not None:
        lse = torch.where(top_k_S > 0, lse, lse_rest)
    probs = (sorted_x - lse[:, None]).exp()
    # Mass strictly before each token: keep tokens until the kept mass reaches top_p.
    before = probs.cumsum(-1) - probs
    drop = (before >= top_p_S[:, None].to(probs.dtype)) & (top_p_S < 1)[:, None]
    return sorted_x.masked_fill(drop, -math.inf)


def filter_logits(x_SV: torch.Tensor, top_k_S: torch.Tensor, top_p_S: torch.Tensor,
                  min_p_S: torch.Tensor) -> torch.Tensor:
    """Set the logits that top-k, then top-p, then min-p remove to -inf (temperature already
    applied). top_k 0, top_p 1 and min_p 0 leave a row untouched. The top token always survives."""
    V = x_SV.shape[-1]
    active = (top_k_S > 0) | (top_p_S < 1)
    if bool(active.any()):
        out = x_SV.clone()
        lse_row = x_SV.logsumexp(-1)
        pending = active.clone()
        for C in sorted({min(V, c) for c in CANDIDATES}):
            rows = pending.nonzero()[:, 0]
            if rows.numel() == 0:
                break
            k, tp = top_k_S[rows], top_p_S[rows]
            vals, idx = x_SV[rows].topk(C, dim=-1)  # (R, C), descending
            cand_mass = (vals.logsumexp(-1) - lse_row[rows]).exp()
            # The kept set lies inside the candidates when top-k does, or, without top-k, when the
            # nucleus closes inside them (every later token has at least cand_mass before it).
            fits = ((k > 0) & (k <= C)) | ((k == 0) & (tp < 1) & (cand_mass >= tp.to(cand_mass.dtype)))
            if C == V:
                fits = torch.ones_like(fits)
            if bool(fits.any()):
                f = fits.nonzero()[:, 0]
                kept = _mask_sorted(vals[f], k[f], tp[f], lse_row[rows[f]])
                out[rows[f]] = torch.full((f.numel(), V), -math.inf, dtype=x_SV.dtype,
                                          device=x_SV.device).scatter_(-1, idx[f], kept)
                pending[rows[f]] = False
        if bool(pending.any()):
            rows = pending.nonzero()[:, 0]
            sorted_x, order = x_SV[rows].sort(-1, descending=True)
            kept = _mask_sorted(sorted_x, top_k_S[rows], top_p_S[rows])
            out[rows] = torch.empty_like(sorted_x).scatter_(-1, order, kept)
        x_SV = out
    if bool((min_p_S > 0).any()):
        # p < min_p * p_max  <=>  logit < max logit + log(min_p); log(0) = -inf drops nothing.
        thresh = x_SV.max(-1, keepdim=True).values + torch.log(min_p_S.to(x_SV.dtype))[:, None]
        x_SV = x_SV.masked_fill(x_SV < thresh, -math.inf)
    return x_SV


def sample(logits_BV: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
           generators: Sequence[torch.Generator] | None = None, prev_tokens=None) -> torch.Tensor:
    """Pick one token per row. logits (B, V) any float dtype -> token ids (B,) int64.

    params: one SamplingParams for all rows or one per row. generators: one per row (see
    make_generators); needed only for rows with temperature > 0 (None: torch's global RNG).
    prev_tokens: what the repetition penalty counts as seen, as B sequences of ids or a (B, V) bool
    mask; needed only when a row's repetition_penalty != 1.
    """
    B, V = logits_BV.shape
    rows = _per_row(params, B)
    device = logits_BV.device
    x = logits_BV.float()
    penalty = [p.repetition_penalty for p in rows]
    if any(p != 1.0 for p in penalty):
        if prev_tokens is None:
            raise UserError("repetition_penalty needs prev_tokens (the tokens seen so far)")
        x = apply_repetition_penalty(x, torch.tensor(penalty, device=device),
                                     presence_mask(prev_tokens, B, V, device))
    out = x.argmax(-1)
    sampled = [b for b, p in enumerate(rows) if not p.greedy]
    if not sampled:
        return out
    if generators is not None and len(generators) != B:
        raise UserError(f"got {len(generators)} generators for a batch of {B}")
    s_idx = torch.tensor(sampled, device=device)

    def col(name):
        return torch.tensor([getattr(rows[b], name) for b in sampled], device=device)

    xs = x.index_select(0, s_idx) / col("temperature")[:, None].float()
    xs = filter_logits(xs, col("top_k"), col("top_p").float(), col("min_p").float())
    probs = xs.softmax(-1)
    for j, b in enumerate(sampled):
        # Exponential race: argmax(p / E), E ~ Exp(1), is an exact draw from p (the Gumbel-max
        # trick); one generator per row keeps rows independent. Only the tokens the filters kept
        # race (a 65k-entry draw costs ~2 ms a row on a CPU core; top-p keeps tens).
        gen = None if generators is None else generators[b]
        kept = torch.isfinite(xs[j]).nonzero()[:, 0]
        pk = probs[j] if kept.numel() == V else probs[j, kept]
        noise = torch.empty(pk.numel(), device=device).exponential_(generator=gen)
        win = (pk / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax()
        out[b] = win if kept.numel() == V else kept[win]
    return out


def token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
    """Log-probability (B,) fp32 of each chosen token under the model's raw distribution."""
    return logits_BV.float().log_softmax(-1).gather(-1, tokens_B[:, None].long())[:, 0]
