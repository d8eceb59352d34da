"""Hostile and careless command lines: every one ends with exit status 0, 1 or 2 and at most one
line of error, never a traceback, never a hang, and never a change to a file outside the output.

In-process calls of `falcon_mamba.cli.main` (fast), plus a few subprocesses where the process
boundary is the point (closed stdin/stdout, stdout on /dev/full, non-UTF-8 stdin). The model is the
embedded default one. Values that pass validation and then reach the sampler's numerics
(temperature 1e-300 and the like) belong to the sampler's own tests.
"""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import falcon_mamba as fm
from falcon_mamba import default_model
from falcon_mamba.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(default_model.path())
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(capsys, *args, stdin=None, monkeypatch=None):
    """(exit status, stdout, stderr) of an in-process command; argparse's exit counts as status."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    t0 = time.monotonic()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse: usage + one error line
        rc = e.code
    out, err = capsys.readouterr()
    assert time.monotonic() - t0 < 60, f"{args} took too long"
    assert "Traceback" not in err, err
    return rc, out, err


def fails_cleanly(capsys, *args, words="", rc=2, **kw):
    code, out, err = run(capsys, *args, **kw)
    lines = err.strip().splitlines()
    assert code == rc, (args, code, err)
    assert len(lines) == 1 and "error:" in lines[0], (args, err)
    assert words in lines[0], (args, err)
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every path under folder with its size, mode and mtime: what 'unchanged' means."""
    out = {}
    for p in sorted(folder.rglob("*")):
        s = p.lstat()
        out[str(p.relative_to(folder))] = (s.st_size, s.st_mode, s.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def other_state(tmp_path_factory):
    """A state file of another model (a tiny random one)."""
    from tests.helpers import tiny_falcon_lm

    path = tmp_path_factory.mktemp("states") / "other.state"
    tiny_falcon_lm(vocab_size=8192).new_state(1).save(path)
    return path


# ---- generate: flags, paths, prompts ----------------------------------------------------------
def test_generate_bad_flags(capsys, tmp_path):
    g = ["generate", "hi", "--max-new-tokens", 2]
    cases = [
        (["--device", "bogus"], "unknown device"),
        (["--device", "tpu"], "unknown device"),
        (["--seed", 2**64], "--seed"),
        (["--seed", -1], "--seed"),
        (["--top-k", 10**20], "--top-k"),
        (["--top-k", -1], "--top-k"),
        (["--temperature", "nan"], "finite"),
        (["--temperature", "1e400"], "finite"),
        (["--top-p", "inf"], "finite"),
        (["--repetition-penalty=-inf"], "finite"),
        (["--max-new-tokens", 10**12], "--max-new-tokens"),
        (["--stop-token-id", -3], "--stop-token-id"),
        (["--chunk-size", -1], "--chunk-size"),
        (["--dtype", "int7"], "dtype"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU"))
    for extra, words in cases:
        fails_cleanly(capsys, *g, *extra, words=words)


def test_generate_state_out_is_checked_before_the_prompt_is_read(capsys, tmp_path, monkeypatch):
    class Untouchable(io.StringIO):
        def read(self, *a):
            raise AssertionError("stdin was read before --state-out was checked")

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for bad, words in ((tmp_path, "is a folder"), (a_file / "x.state", "is a file"),
                       (Path("/proc/falcon-mamba-test.state"), "cannot write")):
        fails_cleanly(capsys, "generate", "-", "--state-out", bad, words=words,
                      stdin=Untouchable(), monkeypatch=monkeypatch)
    assert a_file.read_text() == "x"


def test_generate_bad_prompts_and_states(capsys, tmp_path, other_state):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    big = tmp_path / "big.state"
    st = fm.load_model(MODEL).new_state(1)
    st.ssm.fill_(3e38)  # finite but absurd: used to crash the sampler later
    st.save(big)
    for args, words in [
        (["a\udcffb"], "lone surrogate"),  # argv bytes that were not UTF-8
        (["--prompt-file", "/dev/null"], "empty prompt"),
        (["--prompt-file", latin1], "not UTF-8"),
        (["--prompt-file", tmp_path], "cannot read"),
        (["hi", "--state-in", tmp_path], "is a folder"),
        (["hi", "--state-in", other_state], "another model"),
        (["hi", "--state-in", big], "values over"),
        (["hi", "--stop", "\udcff"], "lone surrogate"),
    ]:
        fails_cleanly(capsys, "generate", "--max-new-tokens", 2, *args, words=words)


def test_non_utf8_stdin_is_refused(capsys, monkeypatch):
    class Bytes(io.StringIO):
        buffer = io.BytesIO(b"caf\xe9 au lait")

    fails_cleanly(capsys, "generate", "-", words="stdin is not UTF-8", stdin=Bytes(), monkeypatch=monkeypatch)
    monkeypatch.setattr(sys, "stdin", None)  # closed stdin
    fails_cleanly(capsys, "generate", "-", words="stdin is closed")


_NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
      .filter(lambda x: x != x or x == 0 or abs(x) >= 1e-6).map(repr),
    st.sampled_from(["1e400", "-1e400", "nan", "inf", "0x10", "", " ", "1_000", "٣", "1e-400"]),
)
_FLAGS = ["--seed", "--top-k", "--temperature", "--top-p", "--min-p", "--repetition-penalty",
          "--chunk-size", "--stop-token-id"]


@FAST
@given(flags=st.dictionaries(st.sampled_from(_FLAGS), _NUMBERS, max_size=3))
def test_generate_numeric_flags_property(capsys, flags):
    args = ["generate", "hi", "--max-new-tokens", 2]
    for k, v in flags.items():
        args += [f"{k}={v}"]
    code, out, err = run(capsys, *args)
    assert code in (0, 2), (args, err)
    if code:
        assert "error:" in err.strip().splitlines()[-1]


# ---- info: folders nothing can load ------------------------------------------------------------
def _folder(tmp_path, name, config=None, weights="copy", extra=None):
    d = tmp_path / name
    d.mkdir()
    cfg = json.loads((default_model.path() / "config.json").read_text())
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    src = default_model.path() / "model.safetensors"
    if weights == "copy":
        (d / "model.safetensors").symlink_to(src)
    elif weights == "truncated":
        (d / "model.safetensors").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif weights == "empty":
        (d / "model.safetensors").write_bytes(b"")
    elif weights == "pickle":
        (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    for fname, data in (extra or {}).items():
        (d / fname).write_text(data)
    return d


def test_info_model_exits_2_on_folders_nothing_can_load(capsys, tmp_path):
    assert run(capsys, "info", "--model", MODEL)[0] == 0
    index = {"weight_map": {"backbone.embeddings.weight": "../other/model.safetensors"}}
    cases = [
        (_folder(tmp_path, "truncated", weights="truncated"), "not a readable safetensors"),
        (_folder(tmp_path, "empty", weights="empty"), "not a readable safetensors"),
        (_folder(tmp_path, "pickle", weights="pickle"), "pickle"),
        (_folder(tmp_path, "none", weights=None), "no model.safetensors"),
        (_folder(tmp_path, "nan-eps", {"layer_norm_epsilon": float("nan")}), "layer_norm_epsilon"),
        (_folder(tmp_path, "huge", {"hidden_size": 10**12}), "hidden_size"),
        (_folder(tmp_path, "float-size", {"hidden_size": 256.9}), "hidden_size must be an integer"),
        (_folder(tmp_path, "eos-abc", {"eos_token_id": "abc"}), "eos_token_id"),
        (_folder(tmp_path, "eos-neg", {"eos_token_id": -3}), "eos_token_id"),
        (_folder(tmp_path, "eos-big", {"eos_token_id": 10**9}), "eos_token_id"),
        (_folder(tmp_path, "shape", {"intermediate_size": 256}), "shape"),
        (_folder(tmp_path, "index-list", weights=None,
                 extra={"model.safetensors.index.json": json.dumps({"weight_map": ["a"]})}), "weight_map"),
        (_folder(tmp_path, "index-escape", weights=None,
                 extra={"model.safetensors.index.json": json.dumps(index)}), "not a file of this folder"),
        (_folder(tmp_path, "deep", extra={"config.json": "[" * 100000}), "not valid JSON"),
    ]
    for folder, words in cases:
        fails_cleanly(capsys, "info", "--model", folder, words=words)
        with pytest.raises(fm.UserError):  # and loading says the same
            fm.load_model(folder)
    if not torch.cuda.is_available():
        fails_cleanly(capsys, "info", "--device", "cuda", words="no CUDA GPU")
    fails_cleanly(capsys, "info", "--device", "bogus", words="unknown device")


# ---- output folders: never delete what the command did not create -----------------------------
def test_quantize_out_never_deletes_inputs_or_other_folders(capsys, tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    model = victim / "m"
    model.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (model / f).write_bytes((default_model.path() / f).read_bytes())
    before = snapshot(tmp_path)
    q = ["quantize", "--model", model, "--bits", 8]
    fails_cleanly(capsys, *q, "--out", victim, words="holds the input")
    fails_cleanly(capsys, *q, "--out", victim, "--overwrite", words="holds the input")
    fails_cleanly(capsys, *q, "--out", model, words="--model folder")
    monkeypatch.chdir(victim)
    fails_cleanly(capsys, *q, "--out", ".", words="current folder")
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    fails_cleanly(capsys, *q, "--out", other, words="--overwrite")
    fails_cleanly(capsys, *q, "--out", other / "notes.txt", words="is a file")
    assert snapshot(tmp_path) == {**before, **{k: v for k, v in snapshot(tmp_path).items()
                                                if k.startswith("other")}}
    assert (other / "notes.txt").read_text() == "mine"
    # a new folder, then the same folder again (an earlier quantize output: replaced)
    out = tmp_path / "q8"
    assert run(capsys, *q, "--out", out)[0] == 0
    assert run(capsys, *q, "--out", out)[0] == 0
    assert fm.load_model(out).quantization["bits"] == 8
    assert run(capsys, *q, "--out", other, "--overwrite")[0] == 0  # asked for: replaced
    assert not (other / "notes.txt").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("victim")} == \
        {k: v for k, v in before.items() if k.startswith("victim")}


def test_prepare_data_overwrite_never_deletes_its_input(capsys, tmp_path):
    d = tmp_path / "D"
    d.mkdir()
    (d / "in.txt").write_text("some text to train on\n" * 50)
    before = snapshot(tmp_path)
    p = ["prepare-data", "--tokenizer", MODEL]
    fails_cleanly(capsys, *p, "--overwrite", "--out", d, d / "in.txt", words="holds the input")
    fails_cleanly(capsys, *p, "--out", d, d / "in.txt", words="holds the input")
    fails_cleanly(capsys, *p, "--out", tmp_path / "new", "--doc-separator", "\\x", d / "in.txt",
                  words="bad backslash escape")
    fails_cleanly(capsys, *p, "--out", tmp_path / "new", "--doc-separator", "", d / "in.txt",
                  words="must not be empty")
    assert snapshot(tmp_path) == before
    assert run(capsys, *p, "--out", tmp_path / "new", "--doc-separator", "\\n\\n", d / "in.txt")[0] == 0


def test_train_bad_flags_and_folders(capsys, tmp_path):
    data = tmp_path / "data"
    (tmp_path / "in.txt").write_text("hello world, this is a corpus\n" * 200)
    assert run(capsys, "prepare-data", "--tokenizer", MODEL, "--out", data, tmp_path / "in.txt")[0] == 0
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("y")
    t = ["train", "--data", data, "--steps", 1]
    for extra, words in [
        (["--out", tmp_path / "r", "--set", "lr=nan"], "finite"),
        (["--out", tmp_path / "r", "--set", "lr=-1"], "lr must be"),
        (["--out", tmp_path / "r", "--set", "seq_len=1e400"], "integer"),
        (["--out", tmp_path / "r", "--set", "model.hidden_size=1e12"], "hidden_size"),
        (["--out", tmp_path / "r", "--stop-at", -1], "--stop-at"),
        (["--out", a_file], "is a file"),
        (["--out", a_file / "run"], "is a file"),
        (["--out", busy], "--overwrite"),
    ]:
        fails_cleanly(capsys, *t, *extra, words=words)
    assert a_file.read_text() == "x" and (busy / "mine.txt").read_text() == "y"
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] = 1e12
    (data / "meta.json").write_text(json.dumps(meta))
    fails_cleanly(capsys, *t, "--out", tmp_path / "r", words="vocab_size")


def test_serve_bad_flags(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    s = ["serve", "--model", MODEL]
    for extra, words in [
        (["--prefix-cache-dir", a_file], "is a file"),
        (["--state-memory", "1e400GiB"], "--state-memory"),
        (["--max-body", "nanMiB"], "--max-body"),
        (["--prefix-cache-disk=-1GiB"], "negative"),
        (["--shutdown-grace", "nan"], "--shutdown-grace"),
        (["--header-timeout", "0"], "--header-timeout"),
        (["--body-timeout", "inf"], "--body-timeout"),
        (["--max-batch", 10**9], "--max-batch"),
        (["--device", "bogus"], "unknown device"),
        (["--port", 70000], "--port"),
        (["--long-prompt-interval", 0], "--long-prompt-interval"),
        (["--step-log", tmp_path / "no" / "such" / "steps.jsonl"], "--step-log"),
        (["--step-log", tmp_path], "--step-log"),
    ]:
        fails_cleanly(capsys, *s, *extra, words=words)
    assert a_file.read_text() == "x"


# ---- chat: a bad command never ends the session -----------------------------------------------
def test_chat_bad_save_and_load_keep_the_session(capsys, tmp_path, monkeypatch, other_state):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    lines = [f"/save {tmp_path}", f"/save {a_file}/s.state", f"/load {tmp_path}", f"/load {other_state}",
             f"/load {tmp_path / 'missing.state'}", f"/load {a_file}", "/bogus", "Hello",
             f"/save {tmp_path / 'ok.state'}", f"/load {tmp_path / 'ok.state'}", "/quit"]
    code, out, err = run(capsys, "chat", "--max-new-tokens", 3, "--temperature", 0,
                         stdin=io.StringIO("\n".join(lines) + "\n"), monkeypatch=monkeypatch)
    assert code == 0, err
    assert err.count("error:") == 7, err
    assert "state saved" in err and "state loaded" in err and out.strip()
    assert "fallback" in err.splitlines()[0]  # says which template it uses


# ---- the process boundary ---------------------------------------------------------------------
def _sh(cmd: str, stdin: bytes | None = None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "-c", cmd], input=stdin, capture_output=True, timeout=timeout,
                          env=env, cwd=ROOT)


PY = f"{sys.executable} -m falcon_mamba"


def test_closed_or_full_stdout_and_closed_stdin():
    r = _sh(f"{PY} generate hi --max-new-tokens 4 > /dev/full")
    assert r.returncode == 1 and b"Exception ignored" not in r.stderr, r.stderr
    assert r.stderr.decode().strip().splitlines() == ["falcon-mamba generate: error: No space left on device"]
    r = _sh(f"{PY} info >&-")
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    r = _sh(f"{PY} generate - <&-")
    assert r.returncode == 2 and b"stdin is closed" in r.stderr and b"Traceback" not in r.stderr, r.stderr
