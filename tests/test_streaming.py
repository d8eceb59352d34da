"""Streaming text (streaming.py, byte_level.py): the byte-table detokenizer against the tokenizer's
own decode and against the two-decode window path it replaces, on the real tokenizers (Falcon,
GPT-NeoX, the embedded model's), one with added tokens, and tokenizers that are not byte-level;
the stop-string matcher against its former implementation.
"""

import os
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from falcon_mamba import default_model
from falcon_mamba.byte_level import build_table, piece_bytes
from falcon_mamba.streaming import (
    ByteStreamDetokenizer,
    IncrementalDetokenizer,
    StopMatcher,
    make_detokenizer,
)
from falcon_mamba.tokenizer import load_tokenizer
from tests.conftest import SHARED

TEXTS = ["日本語のテキスト、中文字符和标点。", "😀🦙🎉 emoji 👩‍👩‍👧 family",
         "héllo wörld — “quotes” ✓ naïve café", "Ελληνικά, русский текст, 한국어 문장",
         "plain words, digits 12345 and\n\n  spaces\t.",
         "mixed 😀a😀b 日a本b", "\ufffd literal replacement char \ufffd"]


def _with_added(tmp_path):
    """The Falcon tokenizer plus added tokens the byte table must leave to the tokenizer: plain
    ones with a space, CJK or a byte-alphabet character, one ending in U+FFFD (the window path
    holds it back: the table path must not take over until it is out), and a special one."""
    hf = HFTokenizer.from_file(os.path.join(SHARED, "tokenizers", "falcon", "tokenizer.json"))
    hf.add_tokens(["<|im start|>", "日本語", " two words", "Ġx", "end\ufffd"])
    hf.add_special_tokens(["<|special|>"])
    path = tmp_path / "added" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """name -> Tokenizer, every one byte-level (table built once, kept for the module)."""
    toks = {"falcon": load_tokenizer(os.path.join(SHARED, "tokenizers", "falcon")),
            "gpt-neox": load_tokenizer(os.path.join(SHARED, "tokenizers", "gpt-neox")),
            "default-model": load_tokenizer(default_model.path()),
            "falcon+added": _with_added(tmp_path_factory.mktemp("tok"))}
    for name, t in toks.items():
        assert t.byte_table is not None, name
    return toks


def _metaspace(tmp_path):
    """A SentencePiece-style BPE (Metaspace: its decoder strips the first token's leading space),
    trained here on a few lines: not byte-level, so it keeps the window path."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(TEXTS * 4 + ["the state of a model is a fixed number of bytes"] * 4,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return load_tokenizer(path)


def _pieces(det, ids):
    return [det.push(i) for i in ids] + [det.flush()]


def _random_streams(tok, rng, n):
    """Token streams of every kind a model can write: random ids (split and invalid UTF-8),
    encoded text, text cut inside a character, added / special tokens in the middle, ids past
    the tokenizer's vocabulary (a model's padded embedding rows: decode skips them)."""
    specials = sorted(tok._tok.get_added_tokens_decoder())
    for _ in range(n):
        ids = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.35:
                ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))]
            elif r < 0.75:
                ids += tok.encode(rng.choice(TEXTS))
            elif r < 0.87:
                ids += tok.encode(rng.choice(TEXTS))[:rng.randint(1, 4)]
            elif r < 0.97:
                ids.append(rng.choice(specials))
            else:
                ids.append(tok.vocab_size + rng.randrange(64))
        yield ids


@pytest.mark.parametrize("name", ["falcon", "gpt-neox", "default-model", "falcon+added"])
def test_table_stream_equals_decode_and_the_window_path(byte_level, name):
    tok = byte_level[name]
    rng = random.Random(name)
    with_specials = 0
    for ids in _random_streams(tok, rng, 400):
        det = make_detokenizer(tok)
        assert isinstance(det, ByteStreamDetokenizer)
        fast = _pieces(det, ids)
        assert "".join(fast) == tok.decode(ids), ids
        # piece for piece as today's path: text (and a stop string) appears at the same token
        assert fast == _pieces(IncrementalDetokenizer(tok), ids), ids
        raw = tok.byte_table.raw
        with_specials += any(i >= len(raw) or raw[i] is None for i in ids)
    assert with_specials > 20, "the window fallback was hardly exercised: test is void"


@pytest.mark.parametrize("name", ["falcon", "gpt-neox", "default-model"])
def test_text_streams_never_split_a_character_and_need_no_tokenizer_call(byte_level, name):
    tok = byte_level[name]
    calls = []

    class Counting:  # the tokenizer, counting its decode calls
        byte_table = tok.byte_table

        def decode(self, ids):
            calls.append(ids)
            return tok.decode(ids)

    split = 0
    for text in TEXTS:
        ids = tok.encode(text * 3)
        split += sum(tok.decode([i]).endswith("\ufffd") for i in ids)
        det = make_detokenizer(Counting())
        pieces = _pieces(det, ids)
        assert "".join(pieces) == text * 3
        done = ""
        for p in pieces:  # every piece is whole characters: each prefix is a prefix of the text
            done += p
            assert (text * 3).startswith(done)
        assert calls == [], "a token in the table went to the tokenizer"
    assert split > 10, "no token ends inside a character: test is void"


def test_a_stream_ending_inside_a_character_flushes_a_replacement(byte_level):
    tok = byte_level["falcon"]
    ids = tok.encode("ok 🦙")[:-1]  # the llama emoji (3 tokens) without its last
    det = make_detokenizer(tok)
    pieces = [det.push(i) for i in ids]
    assert "".join(pieces) == "ok" and pieces[-1] == ""  # the half emoji is held back
    assert det.flush() == tok.decode(ids)[2:] and tok.decode(ids).endswith("\ufffd")
    assert det.flush() == ""  # flushed once


def test_first_token_and_context(byte_level, tmp_path):
    """A byte-level decoder has no first-token rule: the table path starts fresh and gives
    decode(new ids), also for a prompt that ends inside a character (a token-id prompt), where
    the window path lost the character the first tokens completed. A Metaspace decoder strips
    the first token's space: there the prompt's context keeps it, on the window path as before."""
    tok = byte_level["falcon"]
    new = tok.encode(" Hello, world")
    assert "".join(_pieces(make_detokenizer(tok, tok.encode("User: hi\n")), new)) == " Hello, world"
    by_bytes = {b: i for i, b in enumerate(tok.byte_table.raw) if b is not None}
    prompt = [by_bytes[b"\xe2"], by_bytes[b"\x82"]]  # a token-id prompt ending inside "€"
    new = [by_bytes[b"\xac"]] + tok.encode("uro")
    assert "".join(_pieces(make_detokenizer(tok, prompt), new)) == tok.decode(new) == "\ufffduro"

    meta = _metaspace(tmp_path)
    assert meta.byte_table is None
    ctx, new = meta.encode("the state"), meta.encode("the state of a model")[len(meta.encode("the state")):]
    det = make_detokenizer(meta, ctx)
    assert isinstance(det, IncrementalDetokenizer)
    got = "".join(_pieces(det, new))
    assert got == meta.decode(ctx + new)[len(meta.decode(ctx)):]
    assert got != meta.decode(new), "the context changes nothing here: test is void"


def test_which_tokenizers_get_a_table(byte_level, tmp_path):
    falcon = byte_level["falcon"]
    table = falcon.byte_table
    assert table is falcon.byte_table, "built once per tokenizer"
    hello = falcon.encode(" hello")
    assert len(hello) == 1 and table.raw[hello[0]] == b" hello" and table.text[hello[0]] == " hello"
    added = byte_level["falcon+added"]
    raw, text = added.byte_table.raw, added.byte_table.text
    assert len(added._tok.get_added_tokens_decoder()) == 12 + 6
    for i in added._tok.get_added_tokens_decoder():
        assert i >= len(raw) or (raw[i] is None and text[i] is None)
    partial = falcon.encode("😀")
    assert table.text[partial[0]] is None and table.raw[partial[0]] is not None
    assert piece_bytes("Ġhi") == b" hi" and piece_bytes("日本") == "日本".encode()

    hf = falcon._tok
    for dec, expect in [(decoders.Sequence([decoders.ByteLevel()]), True),
                        (decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)]), False),
                        (decoders.Metaspace(), False), (decoders.WordPiece(), False)]:
        hf_copy = HFTokenizer.from_str(hf.to_str())
        hf_copy.decoder = dec
        assert (build_table(hf_copy) is not None) == expect, dec


def test_a_token_whose_decode_disagrees_is_left_to_the_tokenizer(tmp_path):
    """A vocabulary entry with characters outside the byte alphabet decodes as its own UTF-8; the
    table agrees. And an entry the table would get wrong (here: none can, so one is broken by
    hand) is checked against decode and left out."""
    vocab = {"a": 0, "b": 1, "日本": 2, "Ġc": 3, "âĤ": 4, "¬": 5}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.ByteLevel()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(path)
    table = tok.byte_table
    assert table.raw == [b"a", b"b", "日本".encode(), b" c", b"\xe2\x82", b"\xac"]
    for ids in ([0, 2, 3], [4, 5, 1], [4, 1, 5], [5, 4], [4]):
        assert "".join(_pieces(make_detokenizer(tok), ids)) == tok.decode(ids)

    class Lying:  # a decode that disagrees with the byte alphabet for "b"
        def __init__(self, inner):
            self.inner = inner
            self.decoder = inner.decoder

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode_batch(self, batch, skip_special_tokens=False):
            return [("B" if ids == [1] else s) for ids, s in
                    zip(batch, self.inner.decode_batch(batch, skip_special_tokens=skip_special_tokens))]

    assert build_table(Lying(hf)).raw[1] is None


# ---- stop strings ---------------------------------------------------------------------------------
class _ReferenceStopMatcher:
    """StopMatcher as it was before the per-character prefix index (commit ff2030d)."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text):
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self):
        out, self.pending = self.pending, ""
        return out


def test_stop_matcher_equals_its_reference_on_random_text():
    rng = random.Random(7)
    alphabet = "ab\nU:é😀"
    matched_some = held_some = 0
    for _ in range(3000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
                 for _ in range(rng.randint(0, 4))]
        new, ref = StopMatcher(stops), _ReferenceStopMatcher(stops)
        for _ in range(rng.randint(1, 12)):
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
            got, want = new.push(piece), ref.push(piece)
            assert got == want and new.pending == ref.pending, (stops, piece)
            held_some += bool(ref.pending)
            if got[1]:
                matched_some += 1
                break
        else:
            assert new.flush() == ref.flush()
    assert matched_some > 300 and held_some > 300, "test is void"
