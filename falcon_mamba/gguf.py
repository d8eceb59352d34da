"""GGUF export for llama.cpp (and LM Studio, Ollama, ... which run on it): architecture ``mamba``.

    from falcon_mamba.gguf import export_gguf
    export_gguf("model-folder", "model.gguf", outtype="q8_0")

Follows llama.cpp's own converter for Mamba-1 (REFERENCE.md section 7):
- metadata ``mamba.*`` (context length 2^20, embedding length, block count, ssm conv kernel /
  inner size / state size / time step rank, RMS eps) and ``mamba.ssm.dt_b_c_rms = true`` for
  Falcon Mamba (the weightless B/C/dt norms; the original Mamba-1 gets false);
- tensors ``token_embd``, ``output_norm``, ``output`` (left out when tied to the embeddings) and per
  block ``attn_norm``, ``ssm_in``, ``ssm_conv1d`` (weight squeezed to (D, K), bias), ``ssm_x``,
  ``ssm_dt`` (weight, bias), ``ssm_a`` = -exp(A_log), ``ssm_d``, ``ssm_out``;
- 1-D tensors, ``ssm_a``/``ssm_d`` and the conv are F32; the 2-D weights take the outtype: f32,
  f16, bf16, q8_0, or the 4/5-bit block types q4_0, q4_1, q5_0, q5_1 (32 weights per block; a row
  length that is not a multiple of 32 falls back to F16, as llama.cpp's quantizer does). With a
  4/5-bit outtype the output head (``output``, or ``token_embd`` when tied to it) is Q8_0:
  llama-quantize keeps the head at Q6_K for these types, which gguf-py cannot write;
- a GPT-2 style BPE vocabulary: tokens by id, token types (special added tokens CONTROL, ids the
  tokenizer lacks "[PADi]" UNUSED), merges, BOS/EOS/PAD ids and the pre-tokenizer name llama.cpp
  uses for it ("falcon" for the Falcon tokenizer, "gpt-2" for a plain byte-level one and for this
  package's own BPE tokenizers, byte-level + Digits, see ``_digits_split_is_implied``);
- ``tokenizer.chat_template``: the model's chat template (tokenizer_config.json's
  ``chat_template``, a string or the named list transformers writes, or ``chat_template.jinja``),
  else the fallback template ``falcon-mamba chat`` uses for a model without one, so llama.cpp and
  LM Studio render chats as we do.

Tensors are read from the checkpoint and written one at a time: a 7B export never holds the model
in memory. The file is written next to its destination and renamed into place.

Legend: V vocab, H hidden, D inner width, N state size, R dt rank, K conv width.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")  # the output head stays Q8_0 with these
ARCH = "mamba"
CONTEXT_LENGTH = 2**20  # llama.cpp's converter writes this arbitrary value for Mamba


def check_exportable(config: ModelConfig) -> None:
    """UserError for shapes llama.cpp's mamba loader rejects."""
    if config.intermediate_size != 2 * config.hidden_size:
        raise UserError(f"llama.cpp's mamba architecture requires intermediate_size = 2 x hidden_size "
                        f"(it asserts d_inner == 2*d_model); this model has intermediate_size "
                        f"{config.intermediate_size} and hidden_size {config.hidden_size}, so it cannot "
                        "be exported to GGUF")
    if config.use_bias:
        raise UserError("llama.cpp's mamba architecture has no in_proj/out_proj bias, but this model "
                        "uses one (use_bias=true); it cannot be exported to GGUF")


# ---- vocabulary ----------------------------------------------------------------------------------
def _pre_tokenizer_name(tj: dict, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer described in tokenizer.json."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["Punctuation", "ByteLevel", "Digits", "Split"]:
        split = steps[3].get("pattern", {}).get("Regex")
        if split == "[0-9][0-9][0-9]":
            return "falcon"  # punctuation runs, byte-level, digit runs cut in threes
    byte_level = steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False)
    if types == ["ByteLevel"] and byte_level:
        return "gpt-2"
    if types == ["ByteLevel", "Digits"] and byte_level and _digits_split_is_implied(tj, steps[1]):
        return "gpt-2"  # falcon_mamba.data.bpe's tokenizers, the embedded model's included
    raise UserError(f"{path}: this tokenizer's pre-tokenizer ({' + '.join(map(str, types))}) is not one "
                    "this exporter can name for llama.cpp; pass tokenizer_pre= (--tokenizer-pre) with "
                    "llama.cpp's name for it")


def _numeric(ch: str) -> bool:
    """Rust's char::is_numeric (Nd, Nl, No), what the tokenizers Digits pre-tokenizer splits on."""
    import unicodedata

    return unicodedata.category(ch)[0] == "N"


def _digits_split_is_implied(tj: dict, digits: dict) -> bool:
    """Whether GPT-2's split alone (llama.cpp "gpt-2") gives the same tokens as ByteLevel followed
    by Digits, checked on the merges.

    Digits cuts the byte-level pieces between numeric and other characters (individual_digits:
    around every numeric character). A BPE trained on those pieces never learned a merge across
    such a cut, and when no merge joins symbols across one, BPE cannot create a token across it:
    running it on the uncut piece gives the concatenation of the cut pieces' tokens (merges on
    the two sides of an unmergeable junction commute). So the mapping is exact exactly when no
    merge's result mixes numeric and other characters (individual_digits: no merge result holds a
    numeric character at all). Digits sees the byte-mapped text, where the continuation bytes
    0xB2, 0xB3, 0xB9, 0xBC-0xBE are the numeric characters ² ³ ¹ ¼ ½ ¾; the check uses those
    same characters, so it covers them too."""
    individual = digits.get("individual_digits", False)
    for m in (tj.get("model") or {}).get("merges", []):
        joined = m.replace(" ", "") if isinstance(m, str) else "".join(m)
        kinds = {_numeric(c) for c in joined}
        if (individual and True in kinds) or len(kinds) > 1:
            return False
    return True


def chat_template(tokenizer_json: str | os.PathLike) -> tuple[str | list, bool]:
    """(the template to embed, whether it is the model's own): tokenizer_config.json's
    chat_template (a string, or transformers' list of {"name", "template"}), else
    chat_template.jinja beside it, else falcon_mamba.tokenizer's fallback template."""
    from falcon_mamba.tokenizer import FALLBACK_CHAT_TEMPLATE

    folder = Path(tokenizer_json).parent
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            value = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{tc}: not valid JSON ({e})") from None
        if isinstance(value, str) and value:
            return value, True
        if isinstance(value, list) and value:
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
                raise UserError(f"{tc}: chat_template is a list but not of {{'name', 'template'}} objects")
            return value, True
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), True
    return FALLBACK_CHAT_TEMPLATE, False


def vocab_metadata(tokenizer_json: str | os.PathLike, vocab_size: int,
                   tokenizer_pre: str | None = None) -> dict:
    """tokens, token types, merges and the pre-tokenizer name of a BPE tokenizer.json, padded to
    the model's vocab_size."""
    import gguf as G

    path = Path(tokenizer_json)
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; GGUF needs the tokenizer (pass --tokenizer)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: only BPE tokenizers can be exported (this one is {model.get('type')})")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = G.TokenType.CONTROL if added.get("special") else G.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise UserError(f"{path}: the tokenizer has ids up to {max(by_id)} but the model's vocabulary is "
                        f"{vocab_size}; use the tokenizer saved with the model")
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            toktypes.append(int(types.get(i, G.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            toktypes.append(int(G.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": toktypes, "merges": merges,
            "pre": tokenizer_pre or _pre_tokenizer_name(tj, path)}


# ---- tensors -------------------------------------------------------------------------------------
def gguf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """HF checkpoint key -> GGUF tensor name."""
    names = {"backbone.embeddings.weight": "token_embd.weight",
             "backbone.norm_f.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"norm.weight": "attn_norm.weight", "mixer.in_proj.weight": "ssm_in.weight",
                 "mixer.conv1d.weight": "ssm_conv1d.weight", "mixer.conv1d.bias": "ssm_conv1d.bias",
                 "mixer.x_proj.weight": "ssm_x.weight", "mixer.dt_proj.weight": "ssm_dt.weight",
                 "mixer.dt_proj.bias": "ssm_dt.bias", "mixer.A_log": "ssm_a", "mixer.D": "ssm_d",
                 "mixer.out_proj.weight": "ssm_out.weight"}
    for i in range(config.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"backbone.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def _to_gguf_array(hf_name: str, t: torch.Tensor) -> np.ndarray:
    """The float32 array llama.cpp expects for this checkpoint tensor (same memory layout)."""
    t = t.detach().float()
    if hf_name.endswith(".A_log"):
        t = -torch.exp(t)
    elif hf_name.endswith("conv1d.weight"):
        t = t.reshape(t.shape[0], t.shape[-1])  # (D, 1, K) -> (D, K): ggml {K, D}
    return t.contiguous().cpu().numpy()


def _storage_type(gguf_name: str, shape: tuple[int, ...], outtype: str, head: bool = False):
    """The GGML type of one tensor; ``head``: it is the output head (output, or the tied
    token_embd)."""
    import gguf as G

    Q = G.GGMLQuantizationType
    if len(shape) == 1 or not gguf_name.endswith(".weight") or "ssm_conv1d" in gguf_name:
        return Q.F32
    if outtype in ("f32", "f16", "bf16"):
        return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[outtype]
    qtype = Q.Q8_0 if head and outtype in LOW_BIT else Q[outtype.upper()]
    block = G.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16  # blocks run along rows of 32


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf as G

    return G.quants.quantize(arr, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf as G

    block, size = G.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def _folder_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    from falcon_mamba.checkpoint import _open, _weight_files

    files = _weight_files(folder)
    shapes = {}
    for name, path in files.items():
        with _open(path) as f:
            shapes[name] = tuple(f.get_slice(name).get_shape())

    def get(name: str) -> torch.Tensor:
        with _open(files[name]) as f:
            return f.get_tensor(name)

    return shapes, get


def export_gguf(model_ref: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                tokenizer: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
                name: str | None = None, progress: bool = False) -> Path:
    """Write the HF-format model folder ``model_ref`` as a GGUF file llama.cpp loads.

    outtype: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 (2-D weights; the rest is F32).
    tokenizer: a tokenizer.json (default: the one in the model folder); its folder's chat template
    is embedded. Raises UserError for quantized folders (export the original), shapes llama.cpp
    cannot take, and unknown outtypes.
    """
    import gguf as G

    from falcon_mamba.hub import resolve_model_dir

    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    folder = resolve_model_dir(model_ref)
    if (folder / "quantization.json").is_file():
        raise UserError(f"{folder} is a falcon-mamba quantized folder; export the original "
                        "high-precision folder (use --outtype q8_0 or q4_0 for an 8- or 4-bit GGUF)")
    config = ModelConfig.from_json_file(folder / "config.json")
    check_exportable(config)
    tokenizer = Path(tokenizer or folder / "tokenizer.json")
    vocab = vocab_metadata(tokenizer, config.vocab_size, tokenizer_pre)
    template, _ = chat_template(tokenizer)
    shapes, get = _folder_tensors(folder)
    names = gguf_tensor_names(config)
    missing = sorted(set(names) - set(shapes))
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    if not config.use_conv_bias:
        raise UserError("llama.cpp's mamba loader needs a conv1d bias; this model has none "
                        "(use_conv_bias=false)")

    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out must be a .gguf file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    ftype = (G.LlamaFileType.ALL_F32 if outtype == "f32"
             else G.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    try:
        w = G.GGUFWriter(tmp, ARCH)
        w.add_name(name or folder.name)
        w.add_context_length(CONTEXT_LENGTH)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_block_count(config.num_hidden_layers)
        w.add_ssm_conv_kernel(config.conv_kernel)
        w.add_ssm_inner_size(config.intermediate_size)
        w.add_ssm_state_size(config.state_size)
        w.add_ssm_time_step_rank(config.time_step_rank)
        w.add_layer_norm_rms_eps(config.layer_norm_epsilon)
        w.add_ssm_dt_b_c_rms(config.bcdt_rms)
        w.add_file_type(ftype)
        w.add_quantization_version(G.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        for key, tid in (("bos", config.bos_token_id), ("eos", config.eos_token_id),
                         ("pad", config.pad_token_id)):
            if tid is not None:
                getattr(w, f"add_{key}_token_id")(tid)
        w.add_add_bos_token(False)  # as falcon-mamba's tokenizer.encode: no BOS unless asked
        w.add_chat_template(template)

        # Pass 1 declares every tensor (name, shape, type, size); pass 2 streams the data.
        plan = []
        for hf, gg in names.items():
            shape = shapes[hf]
            if hf.endswith("conv1d.weight"):
                shape = (shape[0], shape[-1])
            head = gg == "output.weight" or (gg == "token_embd.weight" and config.tie_word_embeddings)
            qtype = _storage_type(gg, shape, outtype, head)
            plan.append((hf, gg, shape, qtype))
            w.add_tensor_info(gg, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it: Iterator = iter(plan)
        if progress:
            from tqdm import tqdm

            it = tqdm(plan, desc=f"GGUF {outtype}", unit="tensor")
        for hf, gg, shape, qtype in it:
            arr = _to_gguf_array(hf, get(hf))
            data = _encode(arr, qtype)
            assert data.nbytes == _nbytes(shape, qtype), (gg, data.nbytes)
            w.write_tensor_data(data)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
