"""Hostile and damaged files: config.json values, indexes, state headers (one UserError each, never
another exception); files written with the umask's mode; temp files of killed writers cleaned at
the next write; long texts tokenized in pieces exactly as whole, in bounded memory."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import falcon_mamba as fm
from falcon_mamba import atomic, default_model
from falcon_mamba.config import MAX_PARAMETERS, ModelConfig
from falcon_mamba.errors import UserError
from tests.conftest import FALCON_TOKENIZER
from tests.helpers import tiny_falcon_lm

ROOT = Path(__file__).resolve().parents[1]
BASE = json.loads((default_model.path() / "config.json").read_text())
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
                 st.text(max_size=5), st.lists(st.integers(-3, 10**6), max_size=2), st.just({"a": 1}))


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(BASE)), _ANY, max_size=4))
def test_config_values_property(changes):
    d = {**BASE, **changes}
    try:
        cfg = ModelConfig.from_hf_dict(d)
    except UserError:
        return
    assert cfg.num_parameters <= MAX_PARAMETERS
    assert 0 < cfg.layer_norm_epsilon < 1 and cfg.eos_token_id in (None, *range(cfg.vocab_size))
    with torch.device("meta"):  # every accepted config can be built
        fm.FalconMamba(cfg)


@pytest.mark.parametrize("change,words", [
    ({"hidden_size": 10**12}, "hidden_size"), ({"hidden_size": 256.9}, "hidden_size must be an integer"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon"), ({"eos_token_id": "abc"}, "eos_token_id"),
    ({"eos_token_id": -3}, "eos_token_id"), ({"eos_token_id": 10**9}, "eos_token_id"),
    ({"vocab_size": 2**40}, "vocab_size"), ({"use_bias": "yes"}, "use_bias"),
    ({"hidden_size": 65536, "intermediate_size": 1 << 22, "num_hidden_layers": 4096}, "parameters"),
])
def test_bad_config_values(change, words):
    with pytest.raises(UserError, match=words):
        ModelConfig.from_hf_dict({**BASE, **change})
    assert ModelConfig.from_hf_dict({**BASE, "hidden_size": 256.0}).hidden_size == 256


def test_index_must_name_files_of_the_folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").symlink_to(default_model.path() / "model.safetensors")
    for fname in ("../other/model.safetensors", "/etc/passwd", str(tmp_path / "other" / "model.safetensors")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": fname}}))
        with pytest.raises(UserError, match="not a file of this folder"):
            fm.load_model(d)
    for bad in ('{"weight_map": ["x"]}', '{"weight_map": {"a": 3}}', "[]", "{", "[" * 50000):
        (d / "model.safetensors.index.json").write_text(bad)
        with pytest.raises(UserError, match="damaged index"):
            fm.load_model(d)


def test_state_headers_and_values(tmp_path):
    from safetensors.torch import save_file

    model = tiny_falcon_lm(vocab_size=64)
    st_ = model.new_state(1)
    good = tmp_path / "good.state"
    st_.save(good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cases = [
        ({**meta, "config": "not json"}, tensors, "bad config header"),
        ({**meta, "config": "[]"}, tensors, "bad config header"),
        ({**meta, "tokens_seen": "-5"}, tensors, "tokens_seen"),
        ({**meta, "tokens_seen": "9" * 5000}, tensors, "tokens_seen"),
        ({k: v for k, v in meta.items() if k != "sha256"}, {**tensors, "ssm": tensors["ssm"] + 3e38},
         "values over"),
        ({k: v for k, v in meta.items() if k != "sha256"}, {**tensors, "ssm": tensors["ssm"][:1, :, :3]},
         "does not fit the model"),
        ({k: v for k, v in meta.items() if k != "sha256"}, {**tensors, "ssm": tensors["ssm"].double()},
         "dtypes"),
        (meta, {"conv": tensors["conv"]}, "tensors"),
    ]
    for i, (m, t, words) in enumerate(cases):
        p = tmp_path / f"bad{i}.state"
        save_file(t, p, metadata=m)
        with pytest.raises(UserError, match=words):
            fm.load_state(p, model)
    (tmp_path / "junk.state").write_bytes(b"\xff" * 100)
    with pytest.raises(UserError, match="damaged state file"):
        fm.load_state(tmp_path / "junk.state", model)


# ---- modes and temp files ---------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        fm.save_model(tiny_falcon_lm(vocab_size=64), tmp_path / "m")
        tiny_falcon_lm(vocab_size=64).new_state(1).save(tmp_path / "s.state")
    finally:
        os.umask(old)
    for f in [*(tmp_path / "m").iterdir(), tmp_path / "s.state"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~mask


def test_temp_files_of_a_killed_writer_are_removed_at_the_next_write(tmp_path):
    """A real kill -9 in the middle of writing a folder and a state file."""
    code = ("import sys, time; from pathlib import Path; from falcon_mamba import atomic; "
            "d = Path(sys.argv[1]); t = atomic.temp_dir_beside(d / 'out'); (t / 'half').write_text('x'); "
            "atomic.temp_name_beside(d / 's.state').write_text('half'); print('ready', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == b"ready"
    live = atomic.temp_name_beside(tmp_path / "s.state")  # this process's own: kept
    live.write_text("mine, in progress")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    stale = sorted(x.name for x in tmp_path.iterdir() if x.name.endswith(".tmp") and x != live)
    assert len(stale) == 2, stale
    fm.save_model(tiny_falcon_lm(vocab_size=64), tmp_path / "out")
    tiny_falcon_lm(vocab_size=64).new_state(1).save(tmp_path / "s.state")
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["out", "s.state", live.name])


# ---- long texts in pieces ---------------------------------------------------------------------
_PIECES = st.lists(st.sampled_from(["word", " ", "  ", "\n", "\n\n", "\t", "\n ", "42", "1234567", "é",
                                    "☕", "<|endoftext|>", ">>", "...", "\r\n", "Über"]), max_size=300)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=_PIECES)
def test_tokenizing_in_pieces_equals_the_whole(parts, monkeypatch):
    from falcon_mamba import tokenizer as T

    monkeypatch.setattr(T, "PIECE_CHARS", 16)
    monkeypatch.setattr(T, "_WINDOW", 12)
    text = "".join(parts)
    for tok in _toks():
        assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids


def _toks(cache=[]):  # noqa: B006 - loaded once for the hypothesis examples
    if not cache:
        cache += [fm.load_tokenizer(default_model.path()), fm.load_tokenizer(FALCON_TOKENIZER)]
    return cache


def test_eval_blocks_and_prepare_chunks_cut_where_tokenizers_split(tmp_path, monkeypatch):
    import importlib

    from falcon_mamba.eval.perplexity import iter_text_blocks

    prepare = importlib.import_module("falcon_mamba.data.prepare")  # the module, not the function

    text = "".join(f"line {i}\n" + ("\n" * (i % 4)) + (" " * (i % 3)) for i in range(3000))
    f = tmp_path / "t.txt"
    f.write_text(text)
    blocks = [b for b, _ in iter_text_blocks(f, block_bytes=997)]
    assert "".join(blocks) == text and len(blocks) > 10
    monkeypatch.setattr(prepare, "_CHUNK_CHARS", 500)
    chunks = list(prepare._chunks(text))
    assert "".join(chunks) == text and len(chunks) > 10
    for tok in _toks():
        whole = tok._tok.encode(text, add_special_tokens=False).ids
        assert sum((tok.encode(b) for b in blocks), []) == whole
        assert sum((e.ids for e in tok._tok.encode_batch(chunks, add_special_tokens=False)), []) == whole


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset is Linux's")
def test_long_prompt_memory_is_bounded():
    """Peak memory of tokenizing 1.2M characters: in pieces, far below the whole text's ~250 bytes a
    character (measured in a fresh process; the peak RSS is reset before each measurement)."""
    code = """
import re
from falcon_mamba.tokenizer import load_tokenizer
from falcon_mamba import default_model
def rss(k): return int(re.search(k + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
def peak(fn):
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS
    base = rss("VmRSS"); out = fn(); return out, rss("VmHWM") - base
tok = load_tokenizer(default_model.path())
text = "".join(f"The {i}th player of {i * 7919 % 10007} acts, exits; enters.\\n" for i in range(25000))
ids, pieces = peak(lambda: tok.encode(text))
whole_ids, whole = peak(lambda: tok._tok.encode(text, add_special_tokens=False).ids)
assert ids == whole_ids
print(len(text), pieces, whole)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    n, pieces, whole = map(int, r.stdout.split())
    assert n > 1_000_000 and pieces < 40 * n and whole > 4 * pieces, (n, pieces, whole)
