"""Sampling: validation, greedy, filters, penalty, seeds, row independence, distribution."""

import math

import pytest
import torch

from falcon_mamba.errors import UserError
from falcon_mamba.sampling import (
    SamplingParams,
    filter_logits,
    make_generators,
    sample,
    token_logprobs,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids waiting on descheduled workers
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.2}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": -3}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_params_are_one_line_user_errors(kwargs, words):
    with pytest.raises(UserError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_params_normalise_stop_and_ids():
    p = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_greedy_is_argmax(rng):
    logits = torch.randn(5, 300, generator=rng)
    tokens = sample(logits, SamplingParams(temperature=0.0))
    assert torch.equal(tokens, logits.argmax(-1))


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5], [2.0, 1.5, -1.0, 0.5]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # Row 0 has seen token 0: 2.0 / 2 = 1.0 < 1.5, so token 1 wins. Row 1 saw nothing.
    tokens = sample(logits, p, prev_tokens=[[0, 2], []])
    assert tokens.tolist() == [1, 0]
    # A negative logit is multiplied, so it moves further down, never up.
    logits = torch.tensor([[-0.2, -0.3]])
    assert sample(logits, p, prev_tokens=[[0]]).tolist() == [1]
    with pytest.raises(UserError, match="prev_tokens"):
        sample(logits, p)


def test_filters_remove_what_they_should():
    x = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda k=0, p=1.0, m=0.0: torch.isfinite(filter_logits(
        x, torch.tensor([k]), torch.tensor([p]), torch.tensor([m])))[0].tolist()
    assert keep(k=2) == [True, True, False, False, False]
    # top_p 0.6: 0.5 alone is short of 0.6, 0.5 + 0.2 reaches it.
    assert keep(p=0.6) == [True, True, False, False, False]
    assert keep(p=0.85) == [True, True, True, False, False]
    assert keep(p=0.1) == [True, False, False, False, False]
    # min_p 0.25: drop p < 0.125.
    assert keep(m=0.25) == [True, True, True, False, False]
    assert all(keep())
    # top-k then top-p on the renormalised top-k mass (0.5/0.85 = 0.59 < 0.6).
    assert keep(k=3, p=0.6) == [True, True, False, False, False]


def _filter_by_full_sort(x, top_k, top_p, min_p):
    """The filters' definition, written the direct way: sort the whole row, top-k, then top-p on
    the renormalised top-k mass, then min-p."""
    out = x.clone()
    for r in range(x.shape[0]):
        k, tp, mp = int(top_k[r]), float(top_p[r]), float(min_p[r])
        vals, order = x[r].sort(descending=True)
        keep = torch.ones_like(vals, dtype=torch.bool)
        if k > 0:
            keep[k:] = False
        probs = torch.where(keep, vals, -math.inf).softmax(-1)
        if tp < 1:
            before = probs.cumsum(-1) - probs
            keep &= before < tp
        row = torch.full_like(vals, -math.inf)
        row[order[keep]] = vals[keep]
        if mp > 0:
            row = row.masked_fill(row < row.max() + math.log(mp), -math.inf)
        out[r] = row
    return out


def test_filters_match_a_full_sort_on_both_paths(rng, monkeypatch):
    """filter_logits looks at the top CANDIDATES first and sorts a whole row only when the kept
    set may reach past them: peaked and flat rows, top-k inside and beyond the candidates, top-p
    closing inside them or not; every row equals the full-sort definition."""
    import falcon_mamba.sampling as sampling

    monkeypatch.setattr(sampling, "CANDIDATES", (16, 64))
    V = 3000
    rows, ks, ps, ms = [], [], [], []
    for scale in (0.05, 1.0, 4.0):  # flat (nucleus past the candidates) to peaked
        for k in (0, 5, 64, 200):
            for tp in (1.0, 0.3, 0.9, 0.999):
                if k == 0 and tp == 1.0:
                    continue
                rows.append(torch.randn(V, generator=rng) * scale)
                ks.append(k)
                ps.append(tp)
                ms.append(0.0 if len(rows) % 3 else 0.05)
    x = torch.stack(rows)
    top_k, top_p, min_p = torch.tensor(ks), torch.tensor(ps), torch.tensor(ms)
    got = filter_logits(x, top_k, top_p, min_p)
    want = _filter_by_full_sort(x, top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])
    # both paths ran: some rows fit the candidates, some did not
    lse = x.logsumexp(-1)
    mass = (x.topk(64, dim=-1).values.logsumexp(-1) - lse).exp()
    assert bool(((top_k == 0) & (top_p < 1) & (mass < top_p)).any())
    assert bool(((top_k > 0) & (top_k <= 64)).any())


def test_sampled_tokens_stay_inside_the_filter(rng):
    logits = torch.randn(1, 1000, generator=rng) * 3
    allowed = set(logits[0].topk(7).indices.tolist())
    gens = make_generators(5, 1)
    for _ in range(200):
        t = sample(logits, SamplingParams(temperature=1.5, top_k=7), gens).item()
        assert t in allowed


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = torch.log(probs)[None].repeat(4000, 1)
    tokens = sample(logits, SamplingParams(temperature=1.0), make_generators(11, 4000))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    sigma = torch.sqrt(probs * (1 - probs) / 4000)
    assert ((freq - probs).abs() < 4 * sigma).all(), (freq, probs)
    # Temperature 0.5 squares the odds: p^2 renormalised.
    tokens = sample(logits, SamplingParams(temperature=0.5), make_generators(12, 4000))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    sharp = probs**2 / (probs**2).sum()
    assert ((freq - sharp).abs() < 4 * torch.sqrt(sharp * (1 - sharp) / 4000)).all(), (freq, sharp)


def test_same_seed_same_tokens_and_rows_independent(rng):
    logits = torch.randn(3, 500, generator=rng)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    draw = lambda: torch.stack([sample(logits, p, gens) for _ in range(20)])  # noqa: E731
    gens = make_generators(42, 3)
    a = draw()
    gens = make_generators(42, 3)
    assert torch.equal(a, draw())
    gens = make_generators(43, 3)
    assert not torch.equal(a, draw())
    # Row 2 of the batch == a batch of one seeded with seed + 2.
    gens = make_generators(44, 1)
    alone = torch.stack([sample(logits[2:3], p, gens) for _ in range(20)])
    assert torch.equal(alone[:, 0], a[:, 2])


def test_per_row_params():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.3]])).repeat(2, 1)
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)]
    assert sample(logits, rows, make_generators(0, 2)).tolist() == [0, 0]
    with pytest.raises(UserError, match="batch of 2"):
        sample(logits, rows[:1])


def test_token_logprobs(rng):
    logits = torch.randn(2, 50, generator=rng)
    tokens = torch.tensor([3, 7])
    lp = token_logprobs(logits, tokens)
    expect = torch.log(torch.softmax(logits, -1)[[0, 1], [3, 7]])
    assert torch.allclose(lp, expect, atol=1e-6)
    assert (lp < 0).all() and math.isfinite(lp.sum().item())
