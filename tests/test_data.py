"""Data preparation, shards, mixture and the deterministic sampler."""

import json
import random

import numpy as np
import pytest
import torch

from falcon_mamba.data import Sampler, ShardSet, parse_mixture, prepare, val_windows, weights_at
from falcon_mamba.data.shards import dtype_for_vocab
from falcon_mamba.errors import UserError
from falcon_mamba.tokenizer import load_tokenizer
from tests.conftest import FALCON_TOKENIZER

WORDS = ("the cat dog bird sees likes eats finds a small big red blue fish tree house river and then "
         "quickly slowly runs jumps sings under over near").split()


def make_text(seed: int, lines: int = 200) -> str:
    """Random but learnable English-like lines (fresh per seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 10)
        out.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    return "\n".join(out) + "\n"


def make_data(tmp_path, name="data", tokenizer="bpe:300", seed=0, lines=200, **kw):
    """Two text sources and one jsonl source of several documents, prepared into a data folder."""
    a = tmp_path / "alpha.txt"
    a.write_text(make_text(seed, lines), encoding="utf-8")
    b = tmp_path / "beta.txt"
    b.write_text(make_text(seed + 1, lines), encoding="utf-8")
    c = tmp_path / "docs.jsonl"
    c.write_text("".join(json.dumps({"text": make_text(seed + 10 + i, 6)}) + "\n" for i in range(30)),
                 encoding="utf-8")
    return prepare([str(a), str(b), f"gamma={c}"], tmp_path / name, tokenizer, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("d"))


def test_prepare_round_trips_text_and_splits_at_a_line_break(tmp_path):
    text = make_text(7, 300)
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    out = prepare([str(f)], tmp_path / "d", FALCON_TOKENIZER, val_fraction=0.1, log=lambda *a: None)
    data = ShardSet(out)
    tok = load_tokenizer(out / "tokenizer.json")
    assert data.meta["dtype"] == "uint16" and data.vocab_size == 65024
    tr, va = data.source("train", "t"), data.source("val", "t")
    eos = tok.eos_token_id
    assert tr.tokens[-1] == eos and va.tokens[-1] == eos  # every document ends with eos
    train_text = tok.decode([int(i) for i in tr.tokens[:-1]])
    val_text = tok.decode([int(i) for i in va.tokens[:-1]])
    assert train_text + val_text == text
    assert train_text.endswith("\n")  # cut at a line break
    nbytes = len(text.encode())
    assert abs(len(val_text.encode()) - 0.1 * nbytes) < 100
    assert tr.nbytes + va.nbytes == nbytes


def test_jsonl_documents_keep_their_boundaries(data_dir):
    data = ShardSet(data_dir)
    src = data.source("train", "gamma")
    val = data.source("val", "gamma")
    assert len(src.doc_starts) + len(val.doc_starts) == 30
    assert src.doc_starts[0] == 0 and np.all(np.diff(src.doc_starts) > 0)
    eos = data.eos_token_id
    # The token before every document start is the eos that ends the previous one.
    assert all(src.tokens[s - 1] == eos for s in src.doc_starts[1:])
    assert int((np.asarray(src.tokens) == eos).sum()) == len(src.doc_starts)


def test_shard_dtype_follows_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    f = tmp_path / "t.txt"
    f.write_text("w1 w69999 w65536\nw2 w3\n", encoding="utf-8")
    out = prepare([str(f)], tmp_path / "d", str(tmp_path / "big.json"), val_fraction=0, log=lambda *a: None)
    data = ShardSet(out)
    assert data.meta["dtype"] == "uint32"
    assert list(data.source("train", "t").tokens) == [1, 69999, 65536, 2, 3]
    with pytest.raises(UserError, match="uint16 holds ids below 65536"):
        prepare([str(f)], tmp_path / "d2", str(tmp_path / "big.json"), dtype="uint16", log=lambda *a: None)
    assert not (tmp_path / "d2").exists()
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"


def test_bad_inputs_give_clear_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ok\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 3, line 1\)"):
        prepare([str(bad)], tmp_path / "d", "bpe:300", log=lambda *a: None)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="no text to train on"):
        prepare([str(empty)], tmp_path / "d", "bpe:300", log=lambda *a: None)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="is empty; it is not a prepared data folder"):
        ShardSet(tmp_path / "nothing")
    with pytest.raises(UserError, match="no such data folder"):
        ShardSet(tmp_path / "missing")
    j = tmp_path / "x.jsonl"
    j.write_text('{"body": "hi"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="x.jsonl:1: no string field 'text'"):
        prepare([str(j)], tmp_path / "d", "bpe:300", log=lambda *a: None)
    good = tmp_path / "g.txt"
    good.write_text(make_text(3), encoding="utf-8")
    made = prepare([str(good)], tmp_path / "made", "bpe:300", log=lambda *a: None)
    with pytest.raises(UserError, match="exists, is not empty"):
        prepare([str(good)], made, "bpe:300", log=lambda *a: None)


def test_cli_prepare_data_reports_bad_utf8_without_traceback(tmp_path, capsys):
    from falcon_mamba.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["prepare-data", "--tokenizer", "bpe:300", "--out", str(tmp_path / "d"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "Traceback" not in err


def test_mixture_parsing_and_stages():
    st = parse_mixture("a=3,b=1@0.5; a=0,b=1,c=1")
    assert [s.until for s in st] == [0.5, 1.0]
    sizes = {"a": 10, "b": 10, "c": 10}
    assert weights_at(st, 0.2, sizes) == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert weights_at(st, 0.7, sizes) == {"a": 0.0, "b": 0.5, "c": 0.5}
    assert weights_at((), 0.0, {"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    assert parse_mixture("a=1@0.5")[0].until == 1.0  # the last stage always ends at 1
    for bad in ("a=x", "a=1@0.6;b=1@0.4;c=1", "a=0,b=0", "a=1@x;b=1", "a=1;b=1", "a=-1"):
        with pytest.raises(UserError):
            parse_mixture(bad)


def test_sampler_is_deterministic_and_resumable(data_dir):
    data = ShardSet(data_dir)
    a = Sampler(data, seq_len=16, seed=3, mixture="", total_steps=40)
    b = Sampler(data, seq_len=16, seed=3, mixture="", total_steps=40)
    picks_a = [a.next_batch(s, 6) for s in range(10)]
    saved = None
    picks_b = []
    for s in range(10):
        if s == 4:
            saved = json.loads(json.dumps(b.state_dict()))  # a round trip through plain types
            c = Sampler(data, seq_len=16, seed=3, mixture="", total_steps=40)
            c.load_state_dict(saved)
            b = c
        picks_b.append(b.next_batch(s, 6))
    assert picks_a == picks_b
    other = Sampler(data, seq_len=16, seed=4, mixture="", total_steps=40)
    assert [other.next_batch(s, 6) for s in range(10)] != picks_a
    with pytest.raises(UserError, match="other data"):
        Sampler(data, seq_len=32, seed=3, mixture="", total_steps=40).load_state_dict(saved)


def test_sampler_walks_every_window_once_per_epoch(data_dir):
    data = ShardSet(data_dir)
    s = Sampler(data, seq_len=16, seed=0, mixture="alpha=1", total_steps=10)
    n = s.n_windows["alpha"]
    starts = [st for step in range(n // 4) for _, st in s.next_batch(step, 4)]
    assert len(set(starts)) == len(starts) == (n // 4) * 4
    assert all(st % 16 == 0 for st in starts)


def test_curriculum_switches_sources_at_the_stage_boundary(data_dir):
    data = ShardSet(data_dir)
    s = Sampler(data, seq_len=16, seed=0, mixture="alpha=1@0.5; beta=1,gamma=1", total_steps=10)
    first = {n for step in range(5) for n, _ in s.next_batch(step, 8)}
    second = {n for step in range(5, 10) for n, _ in s.next_batch(step, 8)}
    assert first == {"alpha"} and second == {"beta", "gamma"}
    with pytest.raises(UserError, match="lacks"):
        Sampler(data, seq_len=16, seed=0, mixture="alpha=1,web=2", total_steps=10)


def test_batches_mark_document_starts(data_dir):
    data = ShardSet(data_dir)
    s = Sampler(data, seq_len=32, seed=0, mixture="gamma=1", total_steps=10)
    src = s.sources["gamma"]
    batch = s.load(s.next_batch(0, 8))
    assert batch.input_ids.shape == (8, 32) and batch.loss_mask is None
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    starts = set(src.doc_starts.tolist())
    for row in range(8):
        # recover the window start from the tokens: find it among the window starts
        ids = batch.input_ids[row].numpy()
        w0 = next(w for w in range(0, len(src) - 32, 32) if np.array_equal(src.tokens[w:w + 32], ids))
        expect = [(w0 + p) in starts and p > 0 for p in range(32)]
        assert batch.reset[row].tolist() == expect
        # the token before each reset is eos
        for p in np.nonzero(expect)[0]:
            assert ids[p - 1] == data.eos_token_id
    assert batch.reset.any()


def test_val_windows_cover_the_split_once(data_dir):
    data = ShardSet(data_dir)
    wins = val_windows(data, 16)
    for name, src in data.split("val").items():
        starts = [s for n, s in wins if n == name]
        assert starts == list(range(0, len(src) - 1, 16))
