"""falcon_mamba.eval: perplexity / bits per byte (chunked), text file checks, passkey retrieval."""

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

import falcon_mamba as fm
from falcon_mamba.cli import main
from falcon_mamba.errors import UserError
from falcon_mamba.eval import passkey
from falcon_mamba.eval.perplexity import iter_text_blocks, perplexity_file, perplexity_text

TEXT = ("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
        "Première ligne, naïve façade — 12345 ☃\n\nSecond Citizen: One word, good citizens.\n")


def small_bpe(path, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer.json trained on Shakespeare-like lines: a real tokenizer with a
    vocabulary small enough that the test models' lm_head costs nothing (the Falcon one has 65,024)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT * 4, "The pass key is 12345. Remember it. What is the pass key?"], trainer)
    tok.save(str(path))


def tiny_folder(folder, seed: int = 0):
    """A random Falcon Mamba (vocab 512) saved with the small BPE tokenizer."""
    torch.manual_seed(seed)
    cfg = fm.ModelConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=512,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    fm.save_model(fm.FalconMamba(cfg), folder)
    small_bpe(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory.mktemp("eval") / "tiny")
    return folder, fm.load_model(folder), fm.load_tokenizer(folder)


def _direct_nll(model, ids, prefix):
    full = torch.tensor([[prefix] + ids])
    logits, _ = model(full)
    return F.cross_entropy(logits[0, :-1], full[0, 1:], reduction="sum").item()


def test_perplexity_matches_one_forward_any_chunk(tiny):
    _, model, tok = tiny
    ids = tok.encode(TEXT)
    expect = _direct_nll(model, ids, tok.eos_token_id)  # no BOS: EOS starts the text
    for chunk in (3, 4096):
        r = perplexity_text(model, tok, TEXT, chunk_size=chunk)
        assert r.tokens == len(ids) and r.bytes == len(TEXT.encode("utf-8"))
        assert math.isclose(r.nll, expect, rel_tol=2e-5), (chunk, r.nll, expect)
    assert math.isclose(r.perplexity, math.exp(expect / len(ids)), rel_tol=1e-4)
    assert math.isclose(r.bits_per_byte, expect / math.log(2) / r.bytes, rel_tol=1e-4)


def test_text_blocks_split_at_lines_and_keep_every_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    blocks = list(iter_text_blocks(path, block_bytes=16))  # 16-byte reads split multi-byte chars
    assert "".join(t for t, _ in blocks) == TEXT * 3
    assert sum(n for _, n in blocks) == path.stat().st_size
    assert all(t.endswith(("\n", " ")) for t, _ in blocks[:-1])


def test_perplexity_file_equals_text_and_progress(tiny, tmp_path, capsys):
    _, model, tok = tiny
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    a = perplexity_file(model, tok, path, chunk_size=5, progress=True)
    b = perplexity_text(model, tok, TEXT)
    assert a.tokens == b.tokens and math.isclose(a.nll, b.nll, rel_tol=2e-5)
    assert "100%" in capsys.readouterr().err  # the progress bar reached the end


def test_bad_text_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, match in (("empty.txt", "is empty"), ("bin.dat", "not a text file"),
                        ("latin1.txt", "not UTF-8"), ("missing.txt", "no such file")):
        with pytest.raises(UserError, match=match):
            next(iter_text_blocks(tmp_path / name))


def test_cli_eval_perplexity(tiny, tmp_path, capsys):
    folder, model, tok = tiny
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text(TEXT[:40], encoding="utf-8")
    assert main(["eval", "perplexity", "--model", str(folder), str(tmp_path / "a.txt"),
                 str(tmp_path / "b.txt"), "--json", "--no-progress", "--chunk-size", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    a, b, total = out["results"]
    assert math.isclose(a["nll"], perplexity_text(model, tok, TEXT).nll, rel_tol=2e-5)
    assert total["name"] == "total" and total["tokens"] == a["tokens"] + b["tokens"]
    assert math.isclose(total["nll"], a["nll"] + b["nll"], rel_tol=1e-9)
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", "perplexity", "--model", str(folder), str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in capsys.readouterr().err


# ---- passkey ---------------------------------------------------------------------------------------
def test_parse_lengths():
    assert passkey.parse_lengths("1k, 8k,64k,300") == [1024, 8192, 65536, 300]
    for bad in ("", "1x", "k", "0"):
        with pytest.raises(UserError, match="lengths"):
            passkey.parse_lengths(bad)


def test_build_prompt_length_and_depth(tiny):
    _, _, tok = tiny
    for length, depth in ((1024, 0.1), (4096, 0.5), (2000, 0.9)):
        ids = passkey.build_prompt(tok, length, 48213, depth)
        # Whole fillers topped up word by word: short by a few tokens at most, never over.
        assert length - 8 <= len(ids) <= length, (length, len(ids))
        text = tok.decode(ids)
        assert text.count("48213") == 2 and text.endswith("The pass key is")
        assert text.startswith(passkey.INTRO)
        needle = passkey.NEEDLE.format(key=48213)
        filler_chars = len(text) - len(passkey.INTRO) - len(needle) - len(passkey.QUESTION)
        pos = (text.index(needle) - len(passkey.INTRO)) / filler_chars  # share of filler before it
        assert abs(pos - depth) < 0.05, (depth, pos)
    assert passkey.found_key(" 48213. Remember", 48213)
    assert not passkey.found_key(" 4821", 48213) and not passkey.found_key(" the key", 48213)


def test_run_passkey_scores_greedy_outputs(tiny, monkeypatch):
    _, model, tok = tiny
    gen_mod = importlib.import_module("falcon_mamba.generate")
    seen = {}
    real = gen_mod.generate

    def spy(model, tokenizer, prompts, **kw):
        seen["prompts"], seen["kw"] = prompts, kw
        outs = real(model, tokenizer, prompts, **kw)
        # Make the second trial "find" its key, to check the scoring counts it.
        key = tok.decode(prompts[1]).split("The pass key is ")[1][:5]
        return [outs[0], f" {key}. Remember", *outs[2:]]

    monkeypatch.setattr(gen_mod, "generate", spy)
    rows = passkey.run_passkey(model, tok, [300], trials=3, seed=1)
    assert seen["kw"]["temperature"] == 0.0 and len(seen["prompts"]) == 3
    (row,) = rows
    assert row.trials == 3 and row.found >= 1 and row.outputs[1].startswith(" ")
    expect = sum(passkey.found_key(o, int(tok.decode(p).split("The pass key is ")[1][:5]))
                 for o, p in zip(row.outputs, seen["prompts"]))
    assert row.found == expect
    table = passkey.format_table(rows)
    assert "| 300 |" in table and f"{row.accuracy:.0%}" in table


def test_cli_eval_passkey(tiny, capsys):
    folder, _, _ = tiny
    assert main(["eval", "passkey", "--model", str(folder), "--lengths", "200", "--trials", "1",
                 "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["length"] == 200 and row["trials"] == 1 and len(row["outputs"]) == 1
    assert main(["eval", "passkey", "--model", str(folder), "--lengths", "8q"]) == 2
    assert "bad length" in capsys.readouterr().err
