"""Prompt chunks replayed as CUDA graphs (engine/prefill_graphs.py) against the eager forward.

The graphs exist only on CUDA; on the CPU the runner reads every chunk eagerly (checked here too).
"""

import pytest
import torch

from falcon_mamba import FalconMamba, get_preset
from falcon_mamba.decode.modes import DecodeOptions
from falcon_mamba.engine.prefill_graphs import (
    REPLAY_TOKENS,
    ROW_BUCKETS,
    PrefillGraphs,
    continuing_pieces,
    fresh_buckets,
    plan_parts,
)
from falcon_mamba.engine.runner import PrefillWork, Runner
from falcon_mamba.engine.state_pool import StatePool
from tests.helpers import assert_close


def _model(device, dtype=torch.float32):
    torch.manual_seed(0)
    with torch.device(device):
        m = FalconMamba(get_preset("tiny"))
    return m.to_dtype(dtype).eval()


def test_buckets_are_powers_of_two_up_to_the_chunk():
    assert fresh_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert fresh_buckets(100) == [16, 32, 64, 100]
    assert fresh_buckets(8) == [8]


def test_a_continuing_chunk_is_read_in_power_of_two_pieces():
    assert continuing_pieces(512, 512) == [512]
    assert continuing_pieces(160, 512) == [128, 32]
    assert continuing_pieces(499, 500) == [256, 128, 64, 32, 16, 2, 1]
    for n in range(1, 300):
        p = continuing_pieces(n, 300)
        assert sum(p) == n and p == sorted(p, reverse=True) and len(p) <= 9


BUCKETS = (16, 32, 64, 128, 256, 512)
SHAPES = tuple((B, L) for L in BUCKETS for B in ROW_BUCKETS if B * L <= 4096)


def _padded_cost(lengths, sizes, replay=REPLAY_TOKENS):
    """What plan_parts minimises, recomputed from the shapes a plan's parts replay."""
    total, at = 0, 0
    for k in sizes:
        longest = lengths[at]
        if k == 1:
            total += replay + next(b for b in BUCKETS if b >= longest)
        else:
            B, L = next((B, L) for B, L in SHAPES if B >= k and L >= longest)
            total += replay + B * L
        at += k
    assert at == len(lengths)
    return total


def test_plan_parts_weighs_padding_rows_against_another_replay():
    # 49 prompts of ~27 tokens: 48 rows + 1, not 64 rows with 15 of padding
    assert sorted(plan_parts((32,) * 49, BUCKETS, SHAPES)) == [1, 48]
    assert plan_parts((32,) * 64, BUCKETS, SHAPES) == (64,)
    assert plan_parts((32,) * 3, BUCKETS, SHAPES) == (3,)  # the 4-row graph: one replay
    assert plan_parts((32,), BUCKETS, SHAPES) == (1,)
    # a long prompt first, then short ones: it goes alone instead of padding them all to 512
    assert plan_parts((512,) + (16,) * 8, BUCKETS, SHAPES) == (1, 8)
    # more rows than the biggest batch graph: 130 = 64 + 64 + 2
    assert sum(plan_parts((16,) * 130, BUCKETS, SHAPES)) == 130
    assert max(plan_parts((16,) * 130, BUCKETS, SHAPES)) == 64
    # no batch graphs (their capture failed): one row at a time
    assert plan_parts((32,) * 5, BUCKETS, ()) == (1,) * 5
    # a prompt no graph reads
    assert plan_parts((1024, 16), BUCKETS, SHAPES) is None


def test_plan_parts_is_the_cheapest_split():
    """Against every split into consecutive parts, for small random cases (exhaustive search)."""
    import itertools
    import random

    rnd = random.Random(3)
    for _ in range(40):
        n = rnd.randint(1, 9)
        lengths = tuple(sorted((rnd.choice(BUCKETS[:4]) for _ in range(n)), reverse=True))
        got = plan_parts(lengths, BUCKETS, SHAPES)
        best = min(_padded_cost(lengths, [b - a for a, b in zip((0,) + cuts, cuts + (n,))])
                   for r in range(n) for cuts in itertools.combinations(range(1, n), r))
        assert _padded_cost(lengths, got) == best, (lengths, got)


def test_no_graphs_on_the_cpu():
    model = _model("cpu")
    g = PrefillGraphs(model, 64, enabled=True)
    assert not g.enabled and not g.fits(10, False) and not g.fits(64, True)
    pool = StatePool(model.config, 2, model.dtype, model.device)
    assert not Runner(model, pool, prefill_chunk=64).prefill_graphs.enabled


@pytest.mark.cuda
def test_fits_only_one_row_shapes_it_captures_cuda():
    g = PrefillGraphs(_model("cuda"), 64, enabled=True)
    assert g.fits(1, False) and g.fits(64, False) and not g.fits(65, False)
    assert g.fits(64, True) and g.fits(37, True) and not g.fits(65, True)
    assert g.continuing_lengths == [1, 2, 4, 8, 16, 32, 64]
    assert not PrefillGraphs(_model("cuda"), 64, enabled=False).fits(10, False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_chunks_equal_eager_chunks_cuda(dtype):
    """A prompt read fresh (shorter than its bucket, exactly a bucket) then continued by a chunk of
    the chunk length and one of another (read in power-of-two pieces), through the graphs and
    eagerly: same last logits and states."""
    model = _model("cuda", dtype)
    chunk = 64
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    results = {}
    for graphs in (True, False):
        pool = StatePool(model.config, 4, model.dtype, model.device)
        runner = Runner(model, pool, DecodeOptions(cuda_graphs=graphs), prefill_chunk=chunk,
                        prefill_budget=2048)
        assert runner.prefill_graphs.enabled == graphs
        gen.manual_seed(5)
        out = []
        with torch.inference_mode():
            for n in (5, 16, 40):
                ids = torch.randint(0, V, (n + chunk + 37,), generator=gen).tolist()
                pool.park((n, "key"))
                row = pool.row((n, "key"))
                assert runner.prefill([PrefillWork(ids[:n], row, False, False)]) == []
                assert runner.prefill([PrefillWork(ids[n:n + chunk], row, True, False)]) == []
                (w, logits, st), = runner.prefill([PrefillWork(ids[n + chunk:], row, True, True)])
                out.append((logits.clone(), st.conv.clone(), st.ssm.clone()))
                pool.free((n, "key"))
                (w, logits1, st1), = runner.prefill([PrefillWork(ids[:n], None, False, True)])
                out.append((logits1.clone(), st1.conv.clone(), st1.ssm.clone()))
            # a step's fresh prompts: one batched replay (3 prompts in the 4 x 32 graph), and 65
            # (64 rows of the 64 x 64 graph, then one by the one-row graph) vs padded eager batches
            lengths = torch.randint(40, 48, (65,), generator=gen).tolist()  # one batch of _batches
            for works in ([PrefillWork(ids[:k], None, False, True) for k in (9, 13, 30)],
                          [PrefillWork(ids[k % 7:k % 7 + k], None, False, True) for k in lengths]):
                by_prompt = sorted(runner.prefill(works), key=lambda r: (len(r[0].ids), r[0].ids))
                for _w, logits2, st2 in by_prompt:
                    out.append((logits2.clone(), st2.conv.clone(), st2.ssm.clone()))
        if graphs:
            assert sorted(runner.prefill_graphs._graphs) == [(1, True), (4, True), (16, False), (32, True),
                                                              (64, False), (64, True)]
            assert sorted(runner.prefill_graphs._batch_graphs) == [(4, 32), (64, 64)]
        results[graphs] = out
    tol = (2e-4, 2e-4) if dtype == torch.float32 else (3e-2, 3e-2)
    for (a, b) in zip(results[True], results[False]):
        for x, y, what in zip(a, b, ("logits", "conv", "ssm")):
            assert_close(x.float(), y.float(), *tol, what)
