"""The runner: executes a step plan on the model. All the torch of the engine is here.

- Prefill: one chunk of one request, ``model.forward(ids, state, last_only=True)`` from the slot's
  state (None for a fresh prompt's first chunk), the new state copied back into the slot.
- Decode: ``model.step`` on a contiguous view of the decoding slots (rows 0..n-1 of the pool),
  which updates them in place; one token per sequence.
- Sampling: ``falcon_mamba.sampling.sample`` with each sequence's own parameters and generator, so
  a row's draw does not depend on the other rows; log-probabilities of the raw distribution.

Legend: B batch (decoding sequences), L chunk length, V vocab, T top-logprobs count.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from falcon_mamba.engine.request import Sequence
from falcon_mamba.engine.scheduler import PrefillChunk
from falcon_mamba.engine.state_pool import StatePool
from falcon_mamba.model import FalconMamba
from falcon_mamba.sampling import sample


@dataclass
class Sampled:
    """One generated token of one sequence, with its log-probability information if asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


class Runner:
    def __init__(self, model: FalconMamba, pool: StatePool):
        self.model = model
        self.pool = pool
        self.device = model.device

    @torch.inference_mode()
    def prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        """Read one chunk into the request's first slot; the last chunk returns logits (1, V)."""
        req = chunk.request
        key = req.seqs[0].key
        ids_1L = torch.tensor([req.prompt_ids[chunk.start:chunk.end]], dtype=torch.long,
                              device=self.device)
        state = None if chunk.start == 0 else self.pool.view(key)
        logits_1LV, new_state = self.model(ids_1L, state=state, last_only=True)
        self.pool.write(key, new_state)
        return logits_1LV[:, -1] if chunk.is_last else None

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """One step for every sequence: (logits (B, V), the sequence of each row)."""
        by_key = {s.key: s for s in seqs}
        state, keys = self.pool.batch_view(list(by_key))
        rows = [by_key[k] for k in keys]
        tokens_B = torch.tensor([s.output_ids[-1] for s in rows], dtype=torch.long, device=self.device)
        return self.model.step(tokens_B, state), rows

    @torch.inference_mode()
    def sample(self, logits_BV: torch.Tensor, seqs: Seq[Sequence]) -> list[Sampled]:
        """One token per row; seq.extra holds 'generator' and 'params' (SamplingParams) and
        optionally 'top_logprobs' (how many alternatives to report)."""
        params = [s.extra["params"] for s in seqs]
        gens = [s.extra.get("generator") for s in seqs]
        prev = None
        if any(p.repetition_penalty != 1.0 for p in params):
            prev = [s.request.prompt_ids + s.output_ids for s in seqs]
        tokens_B = sample(logits_BV, params, gens, prev)
        out = [Sampled(int(t)) for t in tokens_B.tolist()]
        want = [i for i, p in enumerate(params) if p.logprobs]
        if want:
            idx = torch.tensor(want, device=logits_BV.device)
            logp = logits_BV.index_select(0, idx).float().log_softmax(-1)
            chosen = logp.gather(-1, tokens_B.index_select(0, idx)[:, None])[:, 0].tolist()
            k = max(seqs[i].extra.get("top_logprobs", 0) for i in want)
            top_v, top_i = logp.topk(k, -1) if k else (None, None)
            for j, i in enumerate(want):
                out[i].logprob = chosen[j]
                ki = seqs[i].extra.get("top_logprobs", 0)
                if ki:
                    out[i].top = list(zip(top_i[j, :ki].tolist(), top_v[j, :ki].tolist()))
        return out
