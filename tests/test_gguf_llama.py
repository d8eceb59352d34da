"""llama.cpp (through llama-cpp-python, the ``gguf-test`` extra) loads our GGUF files, tokenizes like
us, and computes the same logits. Skipped only where llama-cpp-python is not installed.

Tolerances, from what differs between the two implementations:
- llama.cpp normalises B, C and dt with eps 1e-5 (its f_norm_rms_eps) where Falcon Mamba uses 1e-6
  (REFERENCE.md pitfall 3). Against our model with mixer_rms_eps set to 1e-5 the f32 file must
  agree to fp32 round-off: max |diff| <= 1e-4 on logits of std ~0.2 (measured 1.1e-6).
- Against the true model (1e-6) that eps moves the logits by a few 1e-4 on this model (measured
  2.6e-4): bound 5e-3, and the argmax must agree wherever our top-2 margin exceeds twice the bound.
- f16 weights round each weight by up to 2^-11 relative (bound 5e-3 on the logits, measured
  1.2e-3); q8_0 by up to 1/254 of a 32-weight block's range (bound: relative L2 error of the
  logits 0.1, measured 0.021).

With FALCON_MAMBA_RECORD_GGUF=path the measured differences are written there as JSON.
"""

import json
import os
import platform

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(pip install 'falcon-mamba[gguf-test]')")

import falcon_mamba as fm  # noqa: E402
from falcon_mamba.gguf import export_gguf  # noqa: E402
from tests.conftest import FALCON_TOKENIZER  # noqa: E402
from tests.test_gguf import save_tiny  # noqa: E402

TEXT = ("The quick brown fox jumps over 12345 lazy dogs, then 3.14159 more! Ça va? "
        "日本語のテキスト — and code: def f(x): return x**2\n\nNew paragraph.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    save_tiny(root / "m", seed=7)
    files = {t: export_gguf(root / "m", root / f"m-{t}.gguf", outtype=t) for t in ("f32", "f16", "q8_0")}
    return root / "m", files


def _llama(path):
    return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                           n_threads=2, seed=0)


def _ours(folder, ids, eps=None):
    model = fm.load_model(folder)
    if eps is not None:
        twin = fm.FalconMamba(model.config.replace(mixer_rms_eps=eps))
        twin.load_state_dict(model.state_dict())
        model = twin.eval()
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy(), model


def test_llama_cpp_matches(setup):
    folder, files = setup
    tok = fm.load_tokenizer(folder)
    ids = tok.encode(TEXT)
    ours, model = _ours(folder, ids)
    ours_llama_eps, _ = _ours(folder, ids, eps=1e-5)
    record = {"tokens": len(ids), "logit_std": float(ours.std()), "files": {}}
    for outtype, path in files.items():
        llm = _llama(path)
        try:
            if outtype == "f32":
                # The tokenizer metadata: llama.cpp's "falcon" pre-tokenizer + our vocab and merges.
                assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False) == ids
                assert llm.n_vocab() == 65024
            llm.eval(ids)
            theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
        finally:
            llm.close()
        d_true = float(np.abs(theirs - ours).max())
        d_eps = float(np.abs(theirs - ours_llama_eps).max())
        rel = float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours))
        agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        record["files"][outtype] = {"max_abs_diff_vs_ours": d_true, "max_abs_diff_vs_ours_eps1e-5": d_eps,
                                    "rel_l2_vs_ours": rel, "argmax_agreement": agree,
                                    "bytes": path.stat().st_size}
        if outtype == "f32":
            assert d_eps <= 1e-4, d_eps
            assert d_true <= 5e-3, d_true
            top2 = np.sort(ours, -1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 2 * 5e-3
            assert clear.sum() > len(ids) // 2
            assert (theirs.argmax(-1) == ours.argmax(-1))[clear].all()
        elif outtype == "f16":
            assert d_eps <= 5e-3, d_eps
        else:
            assert rel <= 0.1, rel
    # Greedy continuation, token by token through llama.cpp's recurrent state, f32 file.
    llm = _llama(files["f32"])
    try:
        theirs_gen = []
        for tok_id in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs_gen.append(tok_id)
            if len(theirs_gen) == 8:
                break
    finally:
        llm.close()
    from falcon_mamba.generate import generate

    ours_gen = generate(model, tok, ids, max_new_tokens=8, temperature=0.0, ignore_eos=True,
                        details=True).token_ids
    record["greedy_8_tokens_equal"] = theirs_gen == ours_gen
    assert theirs_gen == ours_gen
    out = os.environ.get("FALCON_MAMBA_RECORD_GGUF")
    if out:
        import datetime
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
        record |= {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "commit": commit, "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                   "python": platform.python_version(), "model": "random Falcon Mamba, hidden 64, "
                   "2 layers, d_inner 128, vocab 65024 (Falcon tokenizer)"}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


def test_llama_cpp_matches_original_mamba(tmp_path):
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
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    llm = _llama(path)
    try:
        assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False) == ids
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert float(np.abs(theirs - ours).max()) <= 1e-4
