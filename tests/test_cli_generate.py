"""`falcon-mamba generate` and `falcon-mamba chat`: same text as the API, prompt sources, state
files, flags, bad input, one real subprocess each."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba.cli import main
from falcon_mamba.cli.chat import ChatSession
from falcon_mamba.generate import generate, prefill
from falcon_mamba.sampling import SamplingParams
from falcon_mamba.tokenizer import Tokenizer
from tests.conftest import FALCON_TOKENIZER
from tests.helpers import assert_close, tiny_falcon_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids waiting on descheduled workers
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny"
    fm.save_model(tiny_falcon_lm(seed=3), d, tokenizer_dir=os.path.dirname(FALCON_TOKENIZER))
    return str(d)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return fm.load_model(model_dir), fm.load_tokenizer(model_dir)


def cli(capsys, *args):
    """Run `falcon-mamba generate` in-process; on the CPU unless the args name a device, so the
    output can be compared with the CPU model of `loaded` (the default would be CUDA on a GPU)."""
    args = [*map(str, args)]
    if "--device" not in args:
        args += ["--device", "cpu"]
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_prints_what_the_api_returns(capsys, model_dir, loaded):
    model, tok = loaded
    rc, out, err = cli(capsys, "--model", model_dir, "Hello world", "--max-new-tokens", 12,
                       "--temperature", 0)
    assert rc == 0 and err == ""
    assert out == generate(model, tok, "Hello world", max_new_tokens=12, temperature=0.0) != ""
    flags = ["--seed", 5, "--temperature", 0.8, "--top-k", 40, "--top-p", 0.9, "--min-p", 0.01,
             "--repetition-penalty", 1.3]
    rc, out, _ = cli(capsys, "--model", model_dir, "Hello world", "--max-new-tokens", 12, *flags)
    assert out == generate(model, tok, "Hello world", max_new_tokens=12, seed=5, temperature=0.8,
                           top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.3)


def test_prompt_from_file_and_stdin(capsys, model_dir, tmp_path, monkeypatch):
    common = ["--model", model_dir, "--max-new-tokens", 8, "--temperature", 0]
    _, from_arg, _ = cli(capsys, "Über naïve café ☕", *common)
    f = tmp_path / "p.txt"
    f.write_text("Über naïve café ☕", encoding="utf-8")
    _, from_file, _ = cli(capsys, "--prompt-file", f, *common)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Über naïve café ☕"))
    _, from_stdin, _ = cli(capsys, "-", *common)
    assert from_arg == from_file == from_stdin != ""


def test_state_out_then_state_in_continues_the_document(capsys, model_dir, loaded, tmp_path):
    model, tok = loaded
    doc, question = "Mamba reads a document once.", " What does it read?"
    st = tmp_path / "doc.state"
    rc, out, _ = cli(capsys, "--model", model_dir, doc, "--max-new-tokens", 0, "--state-out", st)
    assert rc == 0 and out == ""
    assert fm.load_state(st, model).tokens_seen == len(tok.encode(doc))
    rc, out, _ = cli(capsys, "--model", model_dir, "--state-in", st, question,
                     "--max-new-tokens", 10, "--temperature", 0)
    at_once = generate(model, tok, tok.encode(doc) + tok.encode(question), max_new_tokens=10,
                       temperature=0.0)
    assert rc == 0 and out == at_once
    # --state-out after generating holds the prompt and the generated tokens.
    st2 = tmp_path / "after.state"
    cli(capsys, "--model", model_dir, doc, "--max-new-tokens", 5, "--ignore-eos", "--seed", 1,
        "--state-out", st2)
    assert fm.load_state(st2, model).tokens_seen == len(tok.encode(doc)) + 5


def test_prefill_flags_progress_and_stats(capsys, model_dir):
    prompt = " ".join(["word"] * 40)
    common = ["--model", model_dir, prompt, "--max-new-tokens", 6, "--temperature", 0]
    _, parallel, _ = cli(capsys, *common, "--prefill", "parallel")
    rc, chunked, err = cli(capsys, *common, "--prefill", "chunked", "--chunk-size", 3,
                           "--progress", "--stats")
    assert rc == 0 and chunked == parallel
    assert "reading prompt" in err and "tok/s" in err  # the tqdm bar
    assert "prompt: 40 tokens" in err and "generation: 6 tokens" in err
    assert "peak memory:" in err and "seed:" in err
    _, _, err = cli(capsys, *common, "--prefill", "chunked", "--chunk-size", 3)
    assert "reading prompt" not in err  # stderr is not a terminal and no --progress


def test_logprobs_flag(capsys, model_dir):
    rc, out, err = cli(capsys, "--model", model_dir, "Hi", "--max-new-tokens", 4, "--seed", 2,
                       "--logprobs", "--ignore-eos")
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 4
    assert all(float(line.rsplit("\t", 1)[1]) <= 0 for line in lines)


def _bad_inputs(tmp_path, model_dir):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    other = tmp_path / "other.state"
    fm.FalconMamba(fm.PRESETS["tiny"]).new_state(1).save(other)
    broken = tmp_path / "broken.state"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    m = ["--model", model_dir]
    return [
        ([*m], "no prompt"),
        ([*m, ""], "empty prompt"),
        ([*m, "--prompt-file", tmp_path / "missing.txt"], "cannot read the prompt file"),
        ([*m, "--prompt-file", tmp_path], "cannot read the prompt file"),
        ([*m, "--prompt-file", tmp_path / "latin1.txt"], "not UTF-8"),
        ([*m, "hi", "--prompt-file", tmp_path / "latin1.txt"], "not both"),
        ([*m, "hi", "--temperature", -1], "temperature"),
        ([*m, "hi", "--max-new-tokens", -5], "--max-new-tokens"),
        ([*m, "hi", "--top-p", 0], "top_p"),
        ([*m, "hi", "--top-p", 1.5], "top_p"),
        ([*m, "hi", "--chunk-size", 0], "chunk-size"),
        ([*m, "hi", "--state-in", other], "another model"),
        ([*m, "hi", "--state-in", broken], "damaged state file"),
        ([*m, "hi", "--state-in", tmp_path / "none.state"], "not found"),
        (["--model", tmp_path / "no-model", "hi"], "no-model"),
    ]


def test_bad_input_is_one_clear_line(capsys, model_dir, tmp_path):
    for args, words in _bad_inputs(tmp_path, model_dir):
        rc, out, err = cli(capsys, *args)
        assert rc == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("falcon-mamba generate: error:"), (args, err)
        assert words in lines[0], (args, err)
        assert "Traceback" not in err and out == ""


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def test_subprocess_generate(model_dir, loaded):
    model, tok = loaded
    p = subprocess.run([sys.executable, "-m", "falcon_mamba", "generate", "--model", model_dir,
                        "Hello world", "--max-new-tokens", "10", "--temperature", "0", "--device", "cpu"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == generate(model, tok, "Hello world", max_new_tokens=10, temperature=0.0)


# ---- chat -------------------------------------------------------------------------------------
def test_chat_reads_stdin_with_save_reset_load(model_dir, loaded, tmp_path, capsys, monkeypatch):
    model, _ = loaded
    st = tmp_path / "chat.state"
    script = f"hello\n/save {st}\n/reset\n/load {st}\nand again\n/nonsense\n/save\n/quit\nnot read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc = main(["chat", "--model", model_dir, "--max-new-tokens", "8", "--temperature", "0",
               "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.splitlines()) == 2  # two answers, one line each; /quit stopped reading
    assert f"state saved to {st}" in err and f"state loaded from {st}" in err
    assert "session reset" in err and "unknown command /nonsense" in err
    assert "/save needs a file name" in err
    state = fm.load_state(st, model)
    assert state.tokens_seen >= len("User: hello") // 4


def _session(loaded, **kw):
    model, tok = loaded
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 10), temperature=0.0, **kw)
    return ChatSession(model, tok, params)


def test_chat_save_load_continues_like_the_unsaved_session(loaded, tmp_path):
    a = _session(loaded)
    a.ask("hello", lambda p: None)
    first, _ = a.ask("tell me more", lambda p: None)
    b = _session(loaded)
    b.ask("hello", lambda p: None)
    b.save(tmp_path / "s.state")
    b.reset()
    assert b.state is None
    b.load(tmp_path / "s.state")
    second, _ = b.ask("tell me more", lambda p: None)
    assert first == second != ""


def test_chat_state_is_the_transcript_read(loaded):
    model, tok = loaded
    s = _session(loaded)
    answer, interrupted = s.ask("hello", lambda p: None)
    assert not interrupted and answer
    prompt = "User: hello\n\nAssistant:"
    rest = tok.apply_chat_template([{"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": answer}],
                                   add_generation_prompt=False)[len(prompt):]
    _, expect = prefill(model, tok.encode(prompt) + tok.encode(rest))
    assert_close(s.state.ssm, expect.ssm, 6e-4, 2e-3, "chat state")
    assert s.state.tokens_seen == expect.tokens_seen


def test_ctrl_c_stops_the_answer_and_keeps_the_session(loaded):
    s = _session(loaded, max_new_tokens=40, ignore_eos=True)
    got = []

    def on_piece(p):
        got.append(p)
        if len(got) == 3:
            raise KeyboardInterrupt

    answer, interrupted = s.ask("hello", on_piece)
    assert interrupted and answer == "".join(got) and len(got) == 3
    seen = s.state.tokens_seen
    assert s.messages[-1] == {"role": "assistant", "content": answer}
    more, interrupted = s.ask("go on", lambda p: None)
    assert not interrupted and more and s.state.tokens_seen > seen


def test_chat_template_closing_becomes_a_stop_string(tmp_path):
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = Tokenizer(FALCON_TOKENIZER, {"chat_template": chatml})
    model = tiny_falcon_lm(seed=1)
    s = ChatSession(model, tok, SamplingParams(stop=("X",)))
    assert s.params.stop == ("X", "<|im_end|>")
    s = ChatSession(model, fm.load_tokenizer(FALCON_TOKENIZER), SamplingParams())
    assert s.params.stop == ("\nUser:",)


@pytest.mark.cuda
def test_cuda_cli_stats_report_cuda_memory(capsys, model_dir):
    rc, out, err = cli(capsys, "--model", model_dir, "--device", "cuda", "Hello", "--max-new-tokens", 8,
                       "--seed", 1, "--stats")
    assert rc == 0 and out
    assert "peak CUDA memory allocated" in err and "tok/s" in err


def test_stop_flag_cuts_the_text(capsys, model_dir, loaded):
    from falcon_mamba.cli.generate import unescape

    assert unescape(r"\n\nUser:") == "\n\nUser:" and unescape(r"a\\n\t") == "a\\n\t"
    model, tok = loaded
    full = generate(model, tok, "Hello world", max_new_tokens=16, temperature=0.0)
    stop = full[6:9]
    rc, out, _ = cli(capsys, "--model", model_dir, "Hello world", "--max-new-tokens", 16,
                     "--temperature", 0, "--stop", stop, "--stop", "never seen")
    assert rc == 0 and out == full[:full.find(stop)] and len(out) < len(full)


def test_embedded_default_model_without_model_flag(capsys):
    """With no --model, generate uses the model shipped inside the package and writes English."""
    from falcon_mamba import default_model

    assert default_model.available(), "the embedded default model is missing from the package"
    rc, out, err = cli(capsys, "In the beginning", "--max-new-tokens", "24", "--temperature", "0")
    assert rc == 0, err
    words = out.split()
    assert len(words) >= 10
    common = {"the", "and", "of", "to", "a", "in", "is", "that", "unto", "he", "his", "it", "for"}
    assert sum(w.lower().strip(",.;:") in common for w in words) >= 3, out
