"""The session state cache: longest-prefix lookup, LRU within a byte budget, spill to disk, and
the engine reading only the new tokens of a conversation's next turn."""

import threading

import pytest
import torch

from falcon_mamba.config import PRESETS
from falcon_mamba.engine.prefix_cache import PrefixCache
from falcon_mamba.state import State

CFG = PRESETS["tiny-odd"]


def rand_state(rng) -> State:
    st = State.zeros(CFG, 1)
    st.conv.copy_(torch.randn(st.conv.shape, generator=rng))
    st.ssm.copy_(torch.randn(st.ssm.shape, generator=rng))
    return st


def entry_bytes(n_tokens):
    return State.zeros(CFG, 1).nbytes + 4 * n_tokens


def test_longest_strict_prefix(rng):
    c = PrefixCache(10**7)
    s1, s2, s3 = rand_state(rng), rand_state(rng), rand_state(rng)
    c.put([1, 2, 3], s1)
    c.put([1, 2, 3, 4, 5], s2)
    c.put([9, 9], s3)
    n, st = c.lookup([1, 2, 3, 4, 5, 6, 7])
    assert n == 5 and torch.equal(st.ssm, s2.ssm)
    n, st = c.lookup([1, 2, 3, 4, 7])
    assert n == 3 and torch.equal(st.conv, s1.conv)
    # An exact match is not a hit: the last prompt token must still be read for its logits.
    n, _ = c.lookup([1, 2, 3, 4, 5])
    assert n == 3
    assert c.lookup([1, 2]) is None and c.lookup([2, 1, 2, 3, 4]) is None
    assert c.lookup([9, 9, 1])[0] == 2
    assert (c.hits, c.misses) == (4, 2)


def test_lru_within_byte_budget(rng):
    c = PrefixCache(int(2.5 * entry_bytes(3)))
    c.put([1, 1, 1], rand_state(rng))
    c.put([2, 2, 2], rand_state(rng))
    assert c.lookup([1, 1, 1, 0])[0] == 3  # refresh: [2,2,2] is now the least recently used
    c.put([3, 3, 3], rand_state(rng))
    assert len(c) == 2 and c.mem_bytes <= c.max_bytes
    assert c.lookup([2, 2, 2, 0]) is None
    assert c.lookup([1, 1, 1, 0]) is not None and c.lookup([3, 3, 3, 0]) is not None
    # The same key again refreshes instead of duplicating.
    c.put([3, 3, 3], rand_state(rng))
    assert len(c) == 2
    # Off: nothing is kept.
    off = PrefixCache(0)
    off.put([1, 2], rand_state(rng))
    assert len(off) == 0 and off.lookup([1, 2, 3]) is None


def test_spill_to_disk_and_back(rng, tmp_path):
    user = tmp_path / "spill"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file")
    c = PrefixCache(int(1.5 * entry_bytes(2)), spill_dir=user, max_disk_bytes=10**6)
    d = c.spill_dir  # a private subfolder: the user's folder is never emptied
    assert d.parent == user and d.name.startswith("falcon-mamba-spill.")
    s1, s2, s3 = rand_state(rng), rand_state(rng), rand_state(rng)
    keep1 = s1.clone()
    c.put([1, 1], s1)
    c.put([2, 2], s2)  # [1,1] goes to disk
    assert c.num_on_disk == 1 and len(list(d.iterdir())) == 1 and c.disk_bytes > 0
    n, st = c.lookup([1, 1, 5])  # read back; [2,2] is spilled to make room
    assert n == 2 and torch.equal(st.conv, keep1.conv) and torch.equal(st.ssm, keep1.ssm)
    assert c.num_on_disk == 1 and c.mem_bytes <= c.max_bytes
    # The disk budget holds one file here: a third entry drops the oldest spilled one.
    c.max_disk_bytes = c.disk_bytes
    c.put([3, 3], s3)
    assert len(c) == 2 and len(list(d.iterdir())) == 1
    assert c.lookup([2, 2, 0]) is None and c.lookup([1, 1, 0])[0] == 2
    c.close()
    assert not d.exists()
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_stale_spill_folders_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"falcon-mamba-spill.{dead}.abc123.tmp"
    stale.mkdir()
    (stale / "state-1.safetensors").write_bytes(b"x")
    other = tmp_path / "falcon-mamba-spill.keep"  # not our pattern: left alone
    other.mkdir()
    c = PrefixCache(1 << 20, spill_dir=tmp_path, max_disk_bytes=1 << 20)
    assert not stale.exists() and other.exists()
    c.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["falcon-mamba-spill.keep"]


def test_concurrent_put_and_lookup(rng):
    c = PrefixCache(50 * entry_bytes(4))
    states = [rand_state(rng) for _ in range(8)]
    errors = []

    def worker(seed):
        try:
            for i in range(200):
                k = [seed, i % 13, 7]
                c.put(k, states[(seed + i) % 8])
                hit = c.lookup(k + [1])
                assert hit is None or hit[0] <= 3
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and c.mem_bytes <= c.max_bytes


# ---- in the engine ----------------------------------------------------------------------------
def _serve(engine, prompt, params):
    from falcon_mamba.sampling import SamplingParams  # noqa: F401

    done = threading.Event()
    out = {"ids": [], "lp": []}

    def sink(deltas):
        for d in deltas:
            out["ids"] += d.token_ids
            out["lp"] += d.logprobs
            if d.finish_reason:
                done.set()

    req = engine.submit(prompt, params, top_logprobs=2, sink=sink)
    assert done.wait(60)
    return req, out


@pytest.fixture
def engines():
    from falcon_mamba.engine.engine import Engine, EngineConfig
    from falcon_mamba.model import FalconMamba

    torch.manual_seed(0)
    model = FalconMamba(CFG).eval()

    class Tok:  # a stand-in: ids -> letters, enough for detokenizing
        eos_token_id = None

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    made = [Engine(model, Tok(), EngineConfig(num_slots=2, prefill_chunk=4, cache_bytes=cb,
                                              cache_min_prompt=0))  # its 9-token prompts are kept
            for cb in (10**7, 0)]
    for e in made:
        e.start()
    yield made
    for e in made:
        e.shutdown(1)


def test_next_turn_reads_only_new_tokens(engines, rng):
    from falcon_mamba.sampling import SamplingParams

    cached, plain = engines
    p = SamplingParams(max_new_tokens=5, temperature=0, logprobs=True)
    turn1 = torch.randint(0, CFG.vocab_size, (9,), generator=rng).tolist()
    r1, o1 = _serve(cached, turn1, p)
    assert r1.num_cached == 0
    # The next turn: everything so far (the answer included) plus a new message.
    turn2 = turn1 + o1["ids"] + torch.randint(0, CFG.vocab_size, (6,), generator=rng).tolist()
    r2, o2 = _serve(cached, turn2, p)
    # The state after the answer has read turn1 and every answer token: the decode step after the
    # last token was already running when the engine saw the answer end (engine.py), and fed it.
    assert r2.num_cached == len(turn1) + len(o1["ids"])
    _, ref = _serve(plain, turn2, p)
    got_lp = torch.tensor([x.logprob for x in o2["lp"]])
    ref_lp = torch.tensor([x.logprob for x in ref["lp"]])
    if o2["ids"] != ref["ids"]:  # allowed only at a near-tie, where rounding may pick either
        i = next(j for j, (a, b) in enumerate(zip(o2["ids"], ref["ids"])) if a != b)
        top = ref["lp"][i].top
        assert top[0][1] - top[1][1] < 1e-4, f"token {i} differs without a near-tie"
        got_lp, ref_lp = got_lp[:i + 1], ref_lp[:i + 1]
    torch.testing.assert_close(got_lp, ref_lp, rtol=6e-4, atol=2e-3)
    # A prompt that only shares turn1's prompt hits the end-of-prompt state.
    r3, _ = _serve(cached, turn1 + [1, 2], p)
    assert r3.num_cached == len(turn1)
    assert cached.cache.hits == 2 and plain.cache.hits == 0


def test_a_wave_of_prompts_puts_only_the_states_the_cache_keeps(rng, monkeypatch):
    """Five prompts read in one step into a cache that keeps two states: only the last two are
    put (the earlier three would be evicted by them at once), and they are the ones found later;
    the same for the five answers ending at one step; prompts under cache_min_prompt not at all."""
    from falcon_mamba.engine.engine import Engine, EngineConfig
    from falcon_mamba.model import FalconMamba
    from falcon_mamba.sampling import SamplingParams

    torch.manual_seed(0)
    model = FalconMamba(CFG).eval()

    class Tok:
        eos_token_id = None

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    eng = Engine(model, Tok(), EngineConfig(num_slots=8, prefill_chunk=16, cache_min_prompt=6,
                                            cache_bytes=2 * entry_bytes(6) + 10))
    puts = []
    real_put = eng.cache.put
    monkeypatch.setattr(eng.cache, "put", lambda ids, st: (puts.append(list(ids)), real_put(ids, st)))
    prompts = [torch.randint(0, CFG.vocab_size, (6,), generator=rng).tolist() for _ in range(5)]
    reqs = [eng.submit(p, SamplingParams(max_new_tokens=1, temperature=0)) for p in prompts]
    eng.run_step()  # admits and reads all five, longest (all equal) first in order
    prompt_puts = [p for p in puts if len(p) == 6]
    assert prompt_puts == prompts[-2:]
    for p in prompt_puts:
        assert eng.cache.lookup(p + [1]) is not None
    eng.run_until(lambda: all(r.finished for r in reqs))
    # the answers (6 + 1 tokens fed) ended together: the cache keeps two of them, the last two
    answer_puts = [p for p in puts if len(p) == 7]
    assert [p[:6] for p in answer_puts] == prompts[-2:]
    # prompts shorter than cache_min_prompt are read again rather than kept
    puts.clear()
    eng.config.cache_min_prompt = 7
    reqs = [eng.submit(p, SamplingParams(max_new_tokens=1, temperature=0)) for p in prompts]
    eng.run_until(lambda: all(r.finished for r in reqs))
    assert not [p for p in puts if len(p) == 6] and len(puts) == 2


def test_kept_of_is_what_the_budget_still_holds(tmp_path):
    n = entry_bytes(4)
    dropping = PrefixCache(2 * n + 1)
    assert dropping.kept_of(list("abcde"), n) == ["d", "e"] and dropping.kept_of(["a"], n) == ["a"]
    assert PrefixCache(n - 1).kept_of(list("ab"), n) == []
    spilling = PrefixCache(2 * n + 1, spill_dir=tmp_path, max_disk_bytes=10 * n)
    assert spilling.kept_of(list("abcde"), n) == list("abcde")  # evicted entries go to disk
    spilling.close()
