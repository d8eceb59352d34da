"""Prompt chunks replayed as CUDA graphs (engine/prefill_graphs.py) against the eager forward.

The graphs exist only on CUDA; on the CPU the runner reads every chunk eagerly (checked here too).
"""

import pytest
import torch

from falcon_mamba import FalconMamba, get_preset
from falcon_mamba.decode.modes import DecodeOptions
from falcon_mamba.engine.prefill_graphs import PrefillGraphs, continuing_pieces, fresh_buckets
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
