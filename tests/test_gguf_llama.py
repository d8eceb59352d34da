"""Real llama.cpp (llama-cpp-python) loads every GGUF outtype we write, tokenizes like us, renders
the embedded chat template like us, and computes the logits we compute. OPT-IN:

    pip install -e ".[gguf-test]"                   # builds llama.cpp from source (31 min here)
    pytest --llama-cpp tests/test_gguf_llama.py     # FALCON_MAMBA_RECORD_GGUF=FILE.json records

Why opt-in: PyPI has no prebuilt llama-cpp-python wheel for Linux (``pip download
llama-cpp-python --only-binary=:all:`` finds none; the project's own wheel index is not reachable
from CI), so every CI run would spend the build. Without ``--llama-cpp`` these tests are
deselected (conftest.py), so they never show as a skip; with it, a missing llama-cpp-python is an
import error, not a skip. The recorded run: benchmarks/results/gguf-llama-cpp-*.{json,txt}.

What is compared, per outtype (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0):
- "vs file": our model on the weights as the file stores them (dequantized) and with llama.cpp's
  eps for the B/C/dt norms (1e-5; Falcon Mamba's is 1e-6, REFERENCE.md pitfall 3): what is left
  is llama.cpp's arithmetic, which rounds the activations to the weights' type (f16, bf16) or to
  8-bit blocks (the quantized types) for its dot products;
- "vs ours": our model as loaded (the error of the format plus the above);
- a greedy continuation of 8 tokens through llama.cpp's recurrent state (its decode path, not the
  batch evaluation above): token for token with ours on the file's weights for f32, recorded for
  the other types (a near-tie may go either way once the activations are rounded).
Bounds: relative L2 error of the logits vs file, ~3x the recorded run's (f32 6e-7, f16 5e-4,
bf16 4e-3, the 8/5/4-bit types 0.9-1.7e-2), and for f32 max |diff| <= 1e-4 (measured 1.1e-6 on
logits of std 0.2, 2.5e-5 on the embedded model's of std ~3).
"""

import json
import os
import platform

import numpy as np
import pytest
import torch

import falcon_mamba as fm
from falcon_mamba import default_model
from falcon_mamba.gguf import OUTTYPES, export_gguf, gguf_tensor_names
from tests.conftest import FALCON_TOKENIZER
from tests.test_gguf import TRICKY, _read, save_tiny, values

pytestmark = pytest.mark.llama_cpp

TEXT = ("The quick brown fox jumps over 12345 lazy dogs, then 3.14159 more! Ça va? "
        "日本語のテキスト — and code: def f(x): return x**2\n\nNew paragraph.")
# relative L2 error of the logits vs our model on the file's weights (see the docstring)
BOUND_VS_FILE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 5e-2, "q5_1": 5e-2, "q5_0": 5e-2,
                 "q4_1": 5e-2, "q4_0": 5e-2}
RECORD: dict = {"files": {}}


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp  # opted in (--llama-cpp): a missing package is an error here, never a skip

    return llama_cpp


def _llama(llama_cpp, path):
    return llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, logits_all=True, verbose=False,
                           n_threads=2, seed=0)


def _file_model(folder, gguf_path, eps):
    """Our model with the tensors the GGUF file holds (dequantized), and B/C/dt norm eps ``eps``."""
    model = fm.load_model(folder)
    model = fm.FalconMamba(model.config.replace(mixer_rms_eps=eps)).eval()
    _, t = _read(gguf_path)
    state = {}
    for hf, gg in gguf_tensor_names(model.config).items():
        v = values(t[gg])
        if hf.endswith("A_log"):
            v = torch.log(-v)
        elif hf.endswith("conv1d.weight"):
            v = v[:, None, :]
        state[hf] = v
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    model.load_state_dict(state)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def _greedy(model, tok, ids, n=8):
    from falcon_mamba.generate import generate

    return generate(model, tok, ids, max_new_tokens=n, temperature=0.0, ignore_eos=True,
                    details=True).token_ids


def _llama_greedy(llm, ids, n=8):
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == n:
            break
    return out


def _compare(llama_cpp, label, folder, path, outtype, ids, tok):
    llm = _llama(llama_cpp, path)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
        gen_theirs = _llama_greedy(llm, ids)
    finally:
        llm.close()
    ours = _logits(fm.load_model(folder), ids)
    file_model = _file_model(folder, path, eps=1e-5)
    on_file = _logits(file_model, ids)
    gen_file = _greedy(file_model, tok, ids)
    rel_file = float(np.linalg.norm(theirs - on_file) / np.linalg.norm(on_file))
    d_file = float(np.abs(theirs - on_file).max())
    rec = {"rel_l2_vs_file": rel_file, "max_abs_diff_vs_file": d_file,
           "rel_l2_vs_ours": float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours)),
           "max_abs_diff_vs_ours": float(np.abs(theirs - ours).max()), "logit_std": float(ours.std()),
           "argmax_agreement_vs_file": float((theirs.argmax(-1) == on_file.argmax(-1)).mean()),
           "argmax_agreement_vs_ours": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
           "positions": len(ids), "greedy_8_equal_vs_file": gen_theirs == gen_file, "greedy_8": gen_theirs,
           "bytes": path.stat().st_size}
    RECORD["files"].setdefault(label, {})[outtype] = rec
    assert len(gen_theirs) == 8 and all(0 <= t < file_model.config.vocab_size for t in gen_theirs)
    assert rel_file <= BOUND_VS_FILE[outtype], (outtype, rel_file)
    if outtype == "f32":
        assert d_file <= 1e-4, d_file
        assert gen_theirs == gen_file
    return rec


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    save_tiny(root / "m", seed=7)
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}" \
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    cfg = json.loads((root / "m" / "tokenizer_config.json").read_text()) \
        if (root / "m" / "tokenizer_config.json").is_file() else {}
    (root / "m" / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": template}))
    return root / "m", {t: export_gguf(root / "m", root / f"m-{t}.gguf", outtype=t) for t in OUTTYPES}


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_falcon_tokenizer_model(llama_cpp, tiny_files, outtype):
    """Falcon Mamba (B/C/dt norms), the real Falcon tokenizer ("falcon" pre-tokenizer)."""
    folder, files = tiny_files
    tok = fm.load_tokenizer(folder)
    ids = tok.encode(TEXT)
    if outtype == "f32":
        llm = _llama(llama_cpp, files["f32"])
        try:
            assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False) == ids
            assert llm.n_vocab() == 65024
        finally:
            llm.close()
    _compare(llama_cpp, "tiny-falcon-tokenizer", folder, files[outtype], outtype, ids, tok)


def test_chat_template_renders_as_ours(llama_cpp, tiny_files):
    """llama-cpp-python renders the embedded tokenizer.chat_template (its Jinja2ChatFormatter, what
    its chat completion uses) to the prompt our tokenizer renders."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    folder, files = tiny_files
    tok = fm.load_tokenizer(folder)
    llm = _llama(llama_cpp, files["q4_0"])
    try:
        template = llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    eos = tok.id_to_token(tok.eos_token_id)
    theirs = Jinja2ChatFormatter(template, eos_token=eos, bos_token="")(messages=msgs).prompt
    assert theirs == tok.apply_chat_template(msgs, add_generation_prompt=True)
    RECORD["chat_template_rendering_equal"] = True


@pytest.fixture(scope="module")
def default_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-default")
    return {t: export_gguf(default_model.path(), root / f"default-{t}.gguf", outtype=t)
            for t in ("f32", "q8_0", "q4_0")}


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
def test_embedded_default_model(llama_cpp, default_files, outtype):
    """The embedded model: our own 8k BPE through llama.cpp's "gpt-2" pre-tokenizer, token for token,
    on text full of digits, numeric Latin-1 characters and other scripts."""
    folder = default_model.path()
    tok = fm.load_tokenizer(folder)
    text = TRICKY + " " + TEXT
    ids = tok.encode(text)
    if outtype == "f32":
        llm = _llama(llama_cpp, default_files["f32"])
        try:
            for piece in [text] + text.split(" "):
                assert llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False) == tok.encode(piece)
        finally:
            llm.close()
        RECORD["default_model_tokenization_equal"] = True
    _compare(llama_cpp, "embedded-default-model", folder, default_files[outtype], outtype, ids, tok)


def test_original_mamba_with_neox_tokenizer(llama_cpp, tmp_path):
    """The original Mamba-1 (no B/C/dt norms, head tied to the embeddings) with the GPT-NeoX
    tokenizer ("gpt-2" pre-tokenizer): no eps difference here, so fp32 round-off only."""
    neox = os.path.join(os.path.dirname(FALCON_TOKENIZER), "..", "gpt-neox")
    torch.manual_seed(11)
    cfg = fm.ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=50432,
                         bcdt_rms=False, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    model = fm.FalconMamba(cfg).eval()
    fm.save_model(model, tmp_path / "m", tokenizer_dir=neox)
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", outtype="f32")
    tok = fm.load_tokenizer(tmp_path / "m")
    ids = tok.encode(TEXT)
    ours = _logits(model, ids)
    llm = _llama(llama_cpp, path)
    try:
        assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False) == ids
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    d = float(np.abs(theirs - ours).max())
    RECORD["original_mamba_f32_max_abs_diff"] = d
    assert d <= 1e-4


def test_zz_record(llama_cpp):
    """Writes the measured differences (FALCON_MAMBA_RECORD_GGUF=path); runs last (by name)."""
    out = os.environ.get("FALCON_MAMBA_RECORD_GGUF")
    if not out:
        return
    import datetime
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    RECORD.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "commit": commit, "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                   "python": platform.python_version(),
                   "models": {"tiny-falcon-tokenizer": "random Falcon Mamba, hidden 64, 2 layers, d_inner "
                              "128, vocab 65024 (Falcon tokenizer), a chat template",
                              "embedded-default-model": "falcon_mamba/default_model (7.7M, 8k BPE)"},
                   "bounds_rel_l2_vs_file": BOUND_VS_FILE})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(RECORD, f, indent=2)
