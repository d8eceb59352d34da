"""The engine (engine/engine.py) driven directly: batched prefill, the pipelined decode loop, one
request's failure touching no other, extreme but valid sampling parameters.

A tiny random model (fp32) with the real Falcon tokenizer, one torch thread (a shared 2-core CI
machine), the engine run synchronously in this thread (Engine.run_until), as generate() runs it.
"""

import pytest
import torch

from falcon_mamba.config import ModelConfig
from falcon_mamba.engine.engine import Engine, EngineConfig
from falcon_mamba.generate import prefill
from falcon_mamba.model import FalconMamba
from falcon_mamba.sampling import SamplingParams
from falcon_mamba.tokenizer import load_tokenizer
from tests.conftest import FALCON_TOKENIZER
from tests.helpers import assert_close

TINY = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=65024)
POISON = 7  # a prompt ending in this token gets NaN logits from PoisonModel


class PoisonModel(FalconMamba):
    """The tiny model, except that rows whose input token is POISON get NaN logits (as a broken
    checkpoint or an overflow would give): to check that a failing row fails alone."""

    def forward(self, input_ids, state=None, last_only=False, reset_BL=None):
        logits, st = super().forward(input_ids, state, last_only, reset_BL)
        bad = input_ids[:, -1] == POISON
        return torch.where(bad[:, None, None], torch.nan, logits), st

    def step(self, token_ids_B, state):
        logits = super().step(token_ids_B, state)
        return torch.where((token_ids_B == POISON)[:, None], torch.nan, logits)


@pytest.fixture(scope="module")
def model_and_tok():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PoisonModel(TINY).eval()
    import os

    yield model, load_tokenizer(os.path.dirname(FALCON_TOKENIZER))
    torch.set_num_threads(threads)


def _run(model, tok, jobs, **cfg) -> list[dict]:
    """Submit every (prompt ids, params[, kw]) at once, run the engine until all are done; per job
    {"ids", "text", "finish", "error", "state"}."""
    eng = Engine(model, tok, EngineConfig(**{"num_slots": 16, "max_waiting": 64, "prefill_chunk": 32,
                                            **cfg}))
    outs, reqs = [], []
    for job in jobs:
        ids, params, kw = (*job, {})[:3]
        out = {"ids": [], "text": "", "finish": None, "error": None}

        def sink(deltas, out=out):
            for d in deltas:
                out["ids"] += d.token_ids
                out["text"] += d.text
                if d.finish_reason:
                    out["finish"], out["error"] = d.finish_reason, d.error

        reqs.append(eng.submit(ids, params, sink=sink, **kw))
        outs.append(out)
    eng.run_until(lambda: all(r.finished for r in reqs))
    for out, r in zip(outs, reqs):
        out["state"] = r.seqs[0].extra.get("state")
    assert not eng.busy and eng.pool.num_used == 0, "every row was given back"
    return outs


def _prompts(n, gen, lo=3, hi=40):
    return [torch.randint(11, 4000, (int(torch.randint(lo, hi, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n)]


def test_batched_prefill_and_decode_equal_each_request_alone(model_and_tok, rng):
    """Twelve prompts of different lengths (padded batches of fresh prompts, chunks that continue a
    state) read and decoded together give, row for row, the tokens and the final state of each one
    alone; sampled rows with a seed too."""
    model, tok = model_and_tok
    prompts = _prompts(12, rng, 3, 80)  # several longer than the 32-token chunk
    params = [SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True) if i % 2 else
              SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    jobs = [(p, q, {"want_state": True}) for p, q in zip(prompts, params)]
    together = _run(model, tok, jobs)
    for i, job in enumerate(jobs):
        (alone,) = _run(model, tok, [job])
        assert together[i]["ids"] == alone["ids"], i
        # the final state has read the prompt and every returned token
        _, ref = prefill(model, prompts[i] + alone["ids"], mode="parallel")
        assert_close(together[i]["state"].ssm, ref.ssm, 6e-4, 2e-3, f"final ssm state of {i}")
        assert_close(together[i]["state"].conv, ref.conv, 6e-4, 2e-3, f"final conv state of {i}")


def test_a_bf16_state_pool_serves_each_row_as_alone_and_near_the_fp32_pool(model_and_tok, rng):
    """With the pool's SSM states in bf16 (serve --state-dtype bfloat16): six prompts (some longer
    than a chunk, so their parked state is bf16 between chunks) decoded together equal each one
    alone on a bf16 pool, the caller's final state is fp32, and the greedy tokens and final states
    are the fp32 pool's (within bf16 rounding: measured 40 of 40 tokens equal on each row, states
    within 2e-3 of values up to 0.2)."""
    model, tok = model_and_tok
    bf16 = {"state_dtype": torch.bfloat16}
    prompts = _prompts(6, rng, 3, 80)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    jobs = [(p, params, {"want_state": True}) for p in prompts]
    together = _run(model, tok, jobs, **bf16)
    full = _run(model, tok, jobs)
    same = 0
    for i, job in enumerate(jobs):
        (alone,) = _run(model, tok, [job], **bf16)
        assert together[i]["ids"] == alone["ids"], i
        assert together[i]["state"].ssm.dtype == torch.float32
        if together[i]["ids"] == full[i]["ids"]:  # then the states too, within bf16 rounding
            same += 1
            assert_close(together[i]["state"].ssm, full[i]["state"].ssm, 0.0, 5e-3, f"ssm state {i}")
    assert same >= 5, f"only {same} of 6 rows kept the fp32 pool's greedy tokens"
    eng = Engine(model, tok, EngineConfig(num_slots=2, **bf16))
    assert eng.pool.state.ssm.dtype == torch.bfloat16 and eng.pool.state.conv.dtype == model.dtype


EXTREME = [
    dict(temperature=1e-45), dict(temperature=1e-300), dict(top_p=1e-300), dict(top_k=10 ** 30),
    dict(top_k=2 ** 31 - 1), dict(min_p=1.0), dict(temperature=1e-45, top_p=1e-300, top_k=1),
    dict(repetition_penalty=1e-30), dict(repetition_penalty=1e30), dict(seed=2 ** 64 + 5),
]


def test_extreme_valid_parameters_and_a_failing_row_touch_no_other_row(model_and_tok, rng):
    """The issue's poisoned requests (temperature 1e-45, top_p 1e-300, top_k 1e30, ...) are valid:
    they complete, greedy-like where the temperature or the nucleus leaves one token. A request
    whose logits turn NaN fails alone (finish "error"). Every other stream's text is what it is
    alone."""
    model, tok = model_and_tok
    base = _prompts(6, rng)
    plain = [(p, SamplingParams(max_new_tokens=5, temperature=0.7, seed=i, ignore_eos=True))
             for i, p in enumerate(base)]
    poisoned = [(base[0], SamplingParams(max_new_tokens=5, ignore_eos=True, **kw)) for kw in EXTREME]
    nan_row = [(base[1] + [POISON], SamplingParams(max_new_tokens=5, ignore_eos=True))]
    alone = [_run(model, tok, [j])[0] for j in plain]
    mixed = _run(model, tok, poisoned[:5] + plain[:3] + nan_row + poisoned[5:] + plain[3:])
    got_plain = mixed[5:8] + mixed[-3:]
    for a, b in zip(alone, got_plain):
        assert (a["ids"], a["text"], a["finish"]) == (b["ids"], b["text"], b["finish"])
    bad = mixed[8]
    assert bad["finish"] == "error" and "finite" in bad["error"] and bad["ids"] == []
    greedy = _run(model, tok, [(base[0], SamplingParams(max_new_tokens=5, temperature=0.0,
                                                        ignore_eos=True))])[0]["ids"]
    for kw, out in zip(EXTREME, mixed[:5] + mixed[9:-3]):
        assert out["finish"] == "length" and len(out["ids"]) == 5, kw
        if kw.get("temperature", 1) < 1e-30 or kw.get("top_p", 1) < 1e-30 or kw.get("top_k") == 1:
            assert out["ids"] == greedy, kw  # one token left: the most likely one


def test_nan_logits_midway_end_the_row_with_an_error(model_and_tok, rng):
    """A row whose first token is POISON decodes it at the next step and gets NaN logits there: it
    ends with finish "error" after the token it had."""
    model, tok = model_and_tok

    class FirstPoison(PoisonModel):  # the prompt's logits make POISON the first token
        def forward(self, input_ids, state=None, last_only=False, reset_BL=None):
            logits, st = super().forward(input_ids, state, last_only, reset_BL)
            logits = logits.clone()
            logits[:, -1, POISON] = 1e4
            return logits, st

    m2 = FirstPoison(TINY).eval()
    m2.load_state_dict(model.state_dict())
    ids = _prompts(1, rng)[0]
    (out,) = _run(m2, tok, [(ids, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))])
    assert out["ids"] == [POISON] and out["finish"] == "error" and "finite" in out["error"]


def test_any_valid_sampling_parameters_complete(model_and_tok, rng):
    """Property: whatever valid parameters a request carries (hypothesis draws them across their
    whole range, extremes included), it completes with its tokens in the vocabulary, and a plain
    stream beside it is unchanged."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    model, tok = model_and_tok
    base = _prompts(2, rng)
    plain = (base[1], SamplingParams(max_new_tokens=3, temperature=0.8, seed=3, ignore_eos=True))
    alone = _run(model, tok, [plain])[0]["ids"]
    floats = st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(temperature=floats, top_p=st.floats(min_value=5e-324, max_value=1.0),
           top_k=st.integers(min_value=0, max_value=2 ** 80), min_p=st.floats(0.0, 1.0),
           penalty=st.floats(min_value=1e-300, max_value=1e300), seed=st.integers(0, 2 ** 100))
    def check(temperature, top_p, top_k, min_p, penalty, seed):
        p = SamplingParams(max_new_tokens=3, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                           repetition_penalty=penalty, seed=seed, ignore_eos=True)
        out, other = _run(model, tok, [(base[0], p), plain])
        assert out["finish"] == "length" and len(out["ids"]) == 3
        assert all(0 <= t < TINY.vocab_size for t in out["ids"])
        assert other["ids"] == alone

    check()


def test_step_log_has_a_line_per_computing_step(model_and_tok, rng, tmp_path):
    """--step-log: one JSON line per step that computed, its decode rows and prompt chunks adding
    up to the work submitted."""
    import json

    model, tok = model_and_tok
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(11, 4000, (n,), generator=gen).tolist() for n in (5, 40, 70, 12, 33)]
    with open(tmp_path / "steps.jsonl", "a", buffering=1) as f:
        _run(model, tok, [(p, SamplingParams(max_new_tokens=4, temperature=0.0)) for p in prompts],
             step_log=f)
    recs = [json.loads(ln) for ln in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert sum(r["prefill_tokens"] for r in recs) == sum(len(p) for p in prompts)
    assert sum(r["fresh"] for r in recs) == len(prompts) == sum(r["admitted"] for r in recs)
    # each sequence's 3 tokens after the first (which its prompt's last chunk samples), and one step
    # more: launched before the host reads, a step later, that the row has ended (pipelined readback)
    assert sum(r["decode"] for r in recs) == len(prompts) * 4
    assert all(r["ms"] >= 0 and r["prefill"] or r["decode"] for r in recs)
    assert max(r["longest"] for r in recs) == 32
    # the host time of each step's parts: prompt steps have their forwards inside "prompts"
    for r in recs:
        assert set(r["host_ms"]) >= {"release", "admit", "decode", "readback"}
        assert sum(v for k, v in r["host_ms"].items() if k != "prefill") <= r["ms"] + 1e-3
        if r["prefill"]:
            assert 0 < r["host_ms"]["prefill"] <= r["host_ms"]["prompts"]


def test_prefill_warm_up_leaves_the_rows_as_they_were(model_and_tok):
    from falcon_mamba.engine.runner import Runner
    from falcon_mamba.engine.state_pool import StatePool

    model, _ = model_and_tok
    pool = StatePool(model.config, 4, model.dtype, model.device)
    pool.state.ssm.normal_()
    pool.state.conv.normal_()
    before = pool.state.ssm.clone(), pool.state.conv.clone()
    Runner(model, pool).warm_prefill()
    assert torch.equal(pool.state.ssm, before[0]) and torch.equal(pool.state.conv, before[1])


class _NoTable:
    """The tokenizer without its byte table: the engine detokenizes on the two-decode window path."""

    byte_table = None

    def __init__(self, tok):
        self._tok_ = tok

    def __getattr__(self, name):
        return getattr(self._tok_, name)


def test_streams_are_those_of_the_window_path_and_metrics_count_every_token(model_and_tok, rng):
    """The engine's byte-table detokenizer gives each stream the pieces (text per delta, so where a
    stop string is seen too), tokens and finish reasons of the window path it replaced, with stop
    strings, stop tokens, logprobs and n = 2; the counters, recorded once per step, count every
    token: generated, time to first token per request, time per output token per later token."""
    from falcon_mamba.streaming import ByteStreamDetokenizer, IncrementalDetokenizer

    model, tok = model_and_tok
    prompts = _prompts(6, rng)
    params = [SamplingParams(max_new_tokens=24, temperature=0.9, seed=1, stop=("e",)),
              SamplingParams(max_new_tokens=24, temperature=0.9, seed=2, stop=("in", "on", "\n")),
              SamplingParams(max_new_tokens=16, temperature=0.9, seed=3, logprobs=True, ignore_eos=True),
              SamplingParams(max_new_tokens=20, temperature=0.9, seed=4, stop_token_ids=(prompts[3][0],)),
              SamplingParams(max_new_tokens=12, temperature=1.2, seed=5, ignore_eos=True),
              SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True)]
    runs = {}
    for name, t in (("table", tok), ("window", _NoTable(tok))):
        eng = Engine(model, t, EngineConfig(num_slots=16, max_waiting=16, prefill_chunk=32))
        deltas, reqs = [], []

        def sink(ds, i, deltas=deltas):
            deltas.extend((i, d.index, d.text, d.token_ids, d.finish_reason,
                           [(x.token, x.logprob) for x in d.logprobs]) for d in ds)

        for i, (p, q) in enumerate(zip(prompts, params)):
            reqs.append(eng.submit(p, q, n=2 if i == 4 else 1, top_logprobs=2 if q.logprobs else 0,
                                   sink=lambda ds, i=i, sink=sink: sink(ds, i)))
        kind = ByteStreamDetokenizer if name == "table" else IncrementalDetokenizer
        assert all(type(s.extra["detok"]) is kind for r in reqs for s in r.seqs)
        eng.run_until(lambda reqs=reqs: all(r.finished for r in reqs))
        runs[name] = sorted(deltas, key=lambda x: (x[0], x[1]))  # per stream, in order (stable sort)
        tokens = sum(len(d[3]) for d in deltas)
        streams = sum(r.n for r in reqs)
        assert eng.m_gen_tokens.value() == tokens
        assert eng.m_ttft.count == len(reqs)
        assert eng.m_tpot.count == tokens - streams  # every sequence got at least its first token
    assert runs["table"] == runs["window"]
    finishes = [d[4] for d in runs["table"] if d[4]]
    assert finishes.count("stop") >= 2 and "length" in finishes, "no stop rule was exercised"
