"""GGUF export: metadata, tensor names/shapes/types/values read back with gguf's reader, bad input."""

import json

import numpy as np
import pytest
import torch

import falcon_mamba as fm
from falcon_mamba.cli import main
from falcon_mamba.errors import UserError
from tests.conftest import FALCON_TOKENIZER

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed "
                           "(pip install 'falcon-mamba[gguf]')")
from falcon_mamba.gguf import export_gguf  # noqa: E402

TOK_DIR = str(FALCON_TOKENIZER).rsplit("/", 1)[0]


def save_tiny(folder, seed=0, **over):
    """A random Falcon Mamba that llama.cpp can take (d_inner = 2 d_model), real Falcon vocabulary."""
    torch.manual_seed(seed)
    cfg = fm.ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=65024)
    cfg = cfg.replace(**over)
    model = fm.FalconMamba(cfg)
    with torch.no_grad():  # non-trivial norm weights, D and biases, so a swapped tensor shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.rand(p.shape) * 0.5)
    fm.save_model(model, folder, tokenizer_dir=TOK_DIR)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf") / "tiny"
    return folder, save_tiny(folder)


class _Tensor:
    def __init__(self, name, shape, qtype, data):
        self.name, self.shape, self.data = name, shape, data
        self.tensor_type = gguf.GGMLQuantizationType(qtype)


def _read(path):
    """A small GGUF v3 reader written from the format spec (gguf's own GGUFReader takes ~15 s on a
    65k-token vocabulary): (metadata dict, {name: _Tensor with ggml shape and raw bytes})."""
    import struct

    buf = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, n = take("I"), take("Q")
            return [value(itype) for _ in range(n)]
        return take(scalar[vtype])

    assert buf[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    assert version == 3
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = fields.get("general.alignment", 32)
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        nbytes = int(np.prod(dims)) // block * size
        raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + offset)
        tensors[name] = _Tensor(name, dims, qtype, raw)
    return fields, tensors


def test_metadata_and_vocab(tiny, tmp_path):
    folder, model = tiny
    out = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    f, _ = _read(out)
    c = model.config
    assert f["general.architecture"] == "mamba"
    assert f["mamba.ssm.dt_b_c_rms"] is True
    assert (f["mamba.embedding_length"], f["mamba.block_count"], f["mamba.ssm.inner_size"],
            f["mamba.ssm.state_size"], f["mamba.ssm.time_step_rank"], f["mamba.ssm.conv_kernel"]) == (
        64, 2, 128, c.state_size, c.time_step_rank, c.conv_kernel)
    assert f["mamba.context_length"] == 2**20 and f["mamba.feed_forward_length"] == 0
    assert f["mamba.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.file_type"] == 0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "falcon"
    with open(FALCON_TOKENIZER, encoding="utf-8") as fh:
        tj = json.load(fh)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 65024 and len(types) == 65024
    for t, i in list(tj["model"]["vocab"].items())[::997]:
        assert tokens[i] == t
    assert tokens[11] == "<|endoftext|>" and types[11] == 3 and types[500] == 1  # CONTROL, NORMAL
    assert len(f["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
    assert f["tokenizer.ggml.merges"][0] == " ".join(tj["model"]["merges"][0])
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 11)


# Per outtype: the 2-D weights' type, and the largest error of a weight relative to the tensor's
# largest magnitude: half a step of the format (a block's step is max/8 for q4_0, (max-min)/15 for
# q4_1, ...), a whole step for q4_0 / q5_0, whose codes -8..7 (-16..15) fall one step short of
# the block's largest magnitude when it is positive.
TYPES = {"f32": ("F32", 0), "f16": ("F16", 1e-3), "bf16": ("BF16", 4e-3), "q8_0": ("Q8_0", 1e-2),
         "q5_1": ("Q5_1", 4e-2), "q5_0": ("Q5_0", 7e-2), "q4_1": ("Q4_1", 8e-2), "q4_0": ("Q4_0", 0.13)}


def values(ti):
    """A tensor of the file as float32, in PyTorch's shape (ggml lists ne0 first)."""
    name = ti.tensor_type.name
    if name in ("F32", "F16"):
        data = ti.data.view(np.float32 if name == "F32" else np.float16)
    else:
        size = gguf.GGML_QUANT_SIZES[ti.tensor_type][1]
        data = gguf.quants.dequantize(ti.data.reshape(-1, size), ti.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(list(reversed(ti.shape)))


@pytest.mark.parametrize("outtype", list(TYPES))
def test_tensors(tiny, tmp_path, outtype):
    folder, model = tiny
    _, t = _read(export_gguf(folder, tmp_path / f"m-{outtype}.gguf", outtype=outtype))
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    assert len(t) == 3 + 10 * 2  # token_embd, output_norm, output, 10 per block
    want_2d, tol = TYPES[outtype]
    assert t["token_embd.weight"].tensor_type.name == want_2d
    assert t["blk.1.ssm_in.weight"].tensor_type.name == want_2d
    # 4/5-bit files keep the head at 8 bits (llama-quantize: Q6_K, which gguf-py cannot write).
    low_bit = outtype in ("q5_1", "q5_0", "q4_1", "q4_0")
    assert t["output.weight"].tensor_type.name == ("Q8_0" if low_bit else want_2d)
    assert [int(x) for x in t["blk.1.ssm_in.weight"].shape] == [64, 256]  # ggml order: ne0 first
    assert [int(x) for x in t["blk.0.ssm_conv1d.weight"].shape] == [4, 128]
    assert [int(x) for x in t["blk.0.ssm_a"].shape] == [16, 128]
    for name in ("blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight", "blk.0.ssm_dt.bias",
                 "blk.1.attn_norm.weight", "output_norm.weight"):
        assert t[name].tensor_type.name == "F32", name
    # dt rank 4 is not a multiple of the 32-wide blocks: F16 there, as llama.cpp's quantizer does.
    blocks = want_2d.startswith("Q")
    assert t["blk.0.ssm_dt.weight"].tensor_type.name == ("F16" if blocks else want_2d)

    pairs = {"token_embd.weight": sd["backbone.embeddings.weight"], "output.weight": sd["lm_head.weight"],
             "blk.1.ssm_x.weight": sd["backbone.layers.1.mixer.x_proj.weight"],
             "blk.0.ssm_in.weight": sd["backbone.layers.0.mixer.in_proj.weight"],
             "blk.0.ssm_out.weight": sd["backbone.layers.0.mixer.out_proj.weight"],
             "blk.0.ssm_a": -torch.exp(sd["backbone.layers.0.mixer.A_log"]),
             "blk.0.ssm_conv1d.weight": sd["backbone.layers.0.mixer.conv1d.weight"][:, 0],
             "blk.1.ssm_d": sd["backbone.layers.1.mixer.D"],
             "blk.1.ssm_dt.bias": sd["backbone.layers.1.mixer.dt_proj.bias"]}
    for name, want in pairs.items():
        got = values(t[name])
        scale = want.abs().max().item()
        bound = TYPES["q8_0"][1] if name == "output.weight" and low_bit else tol
        bound = 0 if t[name].tensor_type.name == "F32" else bound
        assert got.shape == want.shape, name
        err = (got - want).abs().max().item()
        assert err <= bound * scale + 1e-7, (name, err / scale)
        if bound:  # the rounding is there (a wrong tensor would fail the bound)
            assert err > 0, name


def test_tied_mamba_model_has_no_output_and_no_bcdt_norms(tmp_path):
    save_tiny(tmp_path / "m", bcdt_rms=False, tie_word_embeddings=True)
    f, t = _read(export_gguf(tmp_path / "m", tmp_path / "m.gguf", outtype="f16"))
    assert f["mamba.ssm.dt_b_c_rms"] is False
    assert "output.weight" not in t and "token_embd.weight" in t


def test_bad_input(tiny, tmp_path, capsys):
    folder, _ = tiny
    save_tiny(tmp_path / "wide", intermediate_size=192)
    with pytest.raises(UserError, match="intermediate_size = 2 x hidden_size"):
        export_gguf(tmp_path / "wide", tmp_path / "w.gguf")
    with pytest.raises(UserError, match="unknown GGUF outtype 'q4_k'"):
        export_gguf(folder, tmp_path / "x.gguf", outtype="q4_k")
    assert main(["convert", "--model", str(folder), "--to", "gguf", "--outtype", "bf8",
                 "--out", str(tmp_path / "x.gguf")]) == 2
    assert ("unknown GGUF outtype 'bf8'; choose one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"
            in capsys.readouterr().err)
    assert main(["convert", "--model", str(folder), "--to", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "unknown target format" in capsys.readouterr().err
    from falcon_mamba.quant import quantize_model, save_quantized

    q = quantize_model(fm.load_model(folder), 8)
    save_quantized(q, tmp_path / "q8", tokenizer_dir=TOK_DIR)
    with pytest.raises(UserError, match="quantized folder; export the original"):
        export_gguf(tmp_path / "q8", tmp_path / "q.gguf")
    assert not list(tmp_path.glob("*.gguf*")), "a failed export left a file behind"


def test_cli_convert(tiny, tmp_path, capsys):
    folder, _ = tiny
    assert main(["convert", "--model", str(folder), "--to", "gguf", "--outtype", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    assert "q8_0" in capsys.readouterr().out
    f, _ = _read(tmp_path / "m.gguf")
    assert f["general.file_type"] == 7  # MOSTLY_Q8_0


def _with_tokenizer_files(src, dst, **files):
    """A copy of the model folder src at dst with extra/replaced tokenizer files."""
    import shutil

    shutil.copytree(src, dst)
    for name, text in files.items():
        (dst / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return dst


def test_chat_template_written(tiny, tmp_path):
    """tokenizer.chat_template: the model's own template in each of the layouts transformers
    writes; the fallback `falcon-mamba chat` uses when there is none."""
    from falcon_mamba.tokenizer import FALLBACK_CHAT_TEMPLATE

    folder, _ = tiny
    own = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    tool = "{{ tools }}" + own
    cases = {
        "string": ({"tokenizer_config__json": json.dumps({"chat_template": own})}, {"": own}),
        "list": ({"tokenizer_config__json": json.dumps({"chat_template": [
            {"name": "default", "template": own}, {"name": "tool_use", "template": tool}]})},
                 {"": own, ".tool_use": tool, "s": ["tool_use"]}),  # + tokenizer.chat_templates
        "jinja": ({"chat_template__jinja": own, "tokenizer_config__json": "{}"}, {"": own}),
        "none": ({"tokenizer_config__json": "{}"}, {"": FALLBACK_CHAT_TEMPLATE}),
    }
    for case, (files, want) in cases.items():
        m = _with_tokenizer_files(folder, tmp_path / case, **files)
        f, _ = _read(export_gguf(m, tmp_path / f"{case}.gguf", outtype="f16"))
        got = {k.removeprefix("tokenizer.chat_template"): v for k, v in f.items()
               if k.startswith("tokenizer.chat_template")}
        assert got == want, case


def test_embedded_default_model_exports(tmp_path, capsys):
    """The embedded model (our own 8k BPE: byte-level + Digits) exports with llama.cpp's "gpt-2"
    pre-tokenizer; `convert` takes it when --model is left out."""
    from falcon_mamba import default_model

    out = tmp_path / "default-q4_0.gguf"
    assert main(["convert", "--to", "gguf", "--outtype", "q4_0", "--out", str(out)]) == 0
    assert "q4_0" in capsys.readouterr().out
    f, t = _read(out)
    cfg = fm.load_model(default_model.path()).config
    assert f["tokenizer.ggml.pre"] == "gpt-2" and len(f["tokenizer.ggml.tokens"]) == cfg.vocab_size == 8192
    assert f["general.file_type"] == 2  # MOSTLY_Q4_0
    assert len(t) == 3 + 10 * cfg.num_hidden_layers
    assert t["blk.3.ssm_in.weight"].tensor_type.name == "Q4_0"
    assert t["output.weight"].tensor_type.name == "Q8_0"


TRICKY = ("Call 555-0199 or 2024/12/01 at 10:30, pay $1,234.56 (12% off) x²+y³=z¹, ¼ ½ ¾ cups; "
          "日本語のテキスト 中文 한국어 — naïve café «quote» 🚀🎉 ٣٤٥ ४५६\n\tdef f(x1, y22):\n"
          "    return x1**2 + 0x1F  # v1.2.3-rc4\n\n\n  spaces   and\ttabs 007 Agent 99 ")


def test_own_bpe_maps_exactly_to_gpt2_pre_tokenizer():
    """A byte-level BPE trained with a Digits pre-tokenizer after ByteLevel (falcon_mamba.data.bpe)
    tokenizes exactly as with GPT-2's split alone, which is what llama.cpp's "gpt-2" runs: the
    Digits cuts are implied by the merges (gguf._digits_split_is_implied). Checked on the
    embedded model's tokenizer over text full of digits, numeric Latin-1 characters (² ¼ ...,
    whose UTF-8 bytes Digits also cuts at), other scripts and whitespace."""
    from tokenizers import Tokenizer, pre_tokenizers

    from falcon_mamba import default_model
    from tests.test_data import make_text

    path = str(default_model.path() / "tokenizer.json")
    ours = Tokenizer.from_file(path)
    gpt2 = Tokenizer.from_file(path)
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    corpus = (TRICKY + "".join(make_text(s, 40) for s in range(3))
              + " ".join(str(n) for n in range(0, 3000, 7)))
    # The two pre-tokenizers do cut differently, so the equality below is the merges' doing.
    assert ours.pre_tokenizer.pre_tokenize_str(TRICKY) != gpt2.pre_tokenizer.pre_tokenize_str(TRICKY)
    for text in [corpus] + corpus.split("\n"):
        want = ours.encode(text, add_special_tokens=False).ids
        assert gpt2.encode(text, add_special_tokens=False).ids == want, text


def test_digits_mapping_refused_when_merges_cross_digits(tmp_path):
    """A byte-level + Digits tokenizer whose merges join a digit to a letter (it was not trained
    with the Digits split) cannot be named "gpt-2": a clear error, not a silently different
    tokenization."""
    from falcon_mamba import default_model
    from falcon_mamba.gguf import vocab_metadata

    tj = json.loads((default_model.path() / "tokenizer.json").read_text(encoding="utf-8"))
    assert vocab_metadata(default_model.path() / "tokenizer.json", 8192)["pre"] == "gpt-2"
    tj["model"]["merges"].append(["a", "1"])
    tj["model"]["vocab"]["a1"] = 8191  # reuse the last id: the vocab size stays
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(UserError, match="ByteLevel \\+ Digits"):
        vocab_metadata(tmp_path / "tokenizer.json", 8192)
