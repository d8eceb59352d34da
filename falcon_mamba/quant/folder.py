"""Quantizing a model in memory, and the quantized folder format (write, strict load).

A quantized folder is an HF-style folder plus ``quantization.json``:

    config.json            the model config, unchanged
    quantization.json      {"format": "falcon-mamba-quant/1", "bits", "group_size", "modules", "dtype"}
    model.safetensors      quantized linears as <module>.qweight / .scales / .zeros (int4) / .bias;
                           everything else (embeddings, norms, conv, A_log, D, dt bias, and any linear
                           not in "modules", e.g. dt_proj in older folders) in high precision
    tokenizer files        copied from the source folder

``fm.load_model`` sees quantization.json and calls ``load_quantized`` (checkpoint.py), so every command
that takes --model takes a quantized folder too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from falcon_mamba.atomic import replace_dir, temp_dir_beside
from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError
from falcon_mamba.model import FP32_PARAM_SUFFIXES, DtProj, FalconMamba
from falcon_mamba.quant import formats
from falcon_mamba.quant.qlinear import QuantLinear

FORMAT = "falcon-mamba-quant/1"
CONFIG_NAME = "quantization.json"
_LINEAR_NAMES = ("in_proj", "x_proj", "dt_proj", "out_proj")


def check_bits(bits: int, group_size: int | None) -> int | None:
    """Validate a (bits, group size) request; returns the group size to use (None for int8)."""
    if bits not in formats.BITS:
        raise UserError(f"--bits must be 8 or 4, got {bits}")
    if bits == 8:
        if group_size is not None:
            raise UserError("int8 is per output channel; --group-size applies to --bits 4 only")
        return None
    group_size = 128 if group_size is None else group_size
    if group_size not in formats.GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, formats.GROUP_SIZES))}, "
                        f"got {group_size}")
    return group_size


def quantizable_modules(model: FalconMamba, include_dt_proj: bool = True) -> list[str]:
    """The linear layers quantization may replace: every mixer projection, and lm_head unless it is
    tied to the embeddings (whose table stays high precision)."""
    kinds = _LINEAR_NAMES if include_dt_proj else tuple(n for n in _LINEAR_NAMES if n != "dt_proj")
    names = [f"backbone.layers.{i}.mixer.{n}" for i in range(model.config.num_hidden_layers)
             for n in kinds]
    if not model.config.tie_word_embeddings:
        names.append("lm_head")
    return names


def default_modules(model: FalconMamba) -> list[str]:
    """What quantize_model replaces by default: every linear layer (quantizable_modules), dt_proj
    included. dt_proj used to stay dense because the fused decode SSM kernel read a dense weight; it
    now dequantizes int8/int4 in place. Measured cost (benchmarks/results/quant-quality-default-model-
    cpu.json, embedded default model, 69k held-out tokens): the perplexity delta moves by at most
    0.007 percentage points (int8 +0.011% -> +0.011%, int4 g128 +1.837% -> +1.840%, g64 +1.699% ->
    +1.706%, g32 +1.227% -> +1.225%); on a random 7B-shaped block the logits' relative L2 error
    grows by at most 0.0003 (quant-quality-cpu.jsonl). Folders written with dt_proj dense still load:
    the loader reads the module list from quantization.json."""
    return quantizable_modules(model)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_model(model: FalconMamba, bits: int, group_size: int | None = None,
                   modules: list[str] | None = None, progress: bool = False) -> FalconMamba:
    """Replace linear layers by QuantLinear, in place (see formats.py for the number formats):
    ``modules`` (default: ``default_modules``), a subset of ``quantizable_modules``. The rounding
    is done in fp32 from the model's current weights. Returns the model."""
    group_size = check_bits(bits, group_size)
    if is_quantized(model):
        raise UserError("this model is already quantized; quantize the original high-precision model")
    names = default_modules(model) if modules is None else list(modules)
    bad = sorted(set(names) - set(quantizable_modules(model)))
    if bad or not names:
        raise UserError(f"not quantizable linear layers of this model: {', '.join(bad) or '(none given)'}")
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc=f"int{bits} quantize", unit="layer")
    for name in it:
        lin = model.get_submodule(name)
        q = QuantLinear.from_linear(lin, bits, group_size, bias_in_forward=not isinstance(lin, DtProj))
        q.act_dtype = model.dtype
        _set_module(model, name, q)
    model.quantization = {"format": FORMAT, "bits": bits, "group_size": group_size, "modules": names,
                          "dtype": str(model.dtype).removeprefix("torch.")}
    return model


def save_quantized(model: FalconMamba, out: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a quantized model as a folder that ``fm.load_model`` loads back. The folder is built
    next to ``out`` and renamed into place, so a crash never leaves a half-written one."""
    from falcon_mamba.checkpoint import save_model

    meta = getattr(model, "quantization", None)
    if meta is None or not is_quantized(model):
        raise UserError("save_quantized needs a model quantized with quantize_model")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; --out must be a folder")
    tmp = temp_dir_beside(out)
    try:
        stage = save_model(model, tmp / "stage", tokenizer_dir=tokenizer_dir)
        (stage / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(stage, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_quantization_json(folder: Path, config: ModelConfig) -> dict:
    path = folder / CONFIG_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a falcon-mamba quantization file (expected format {FORMAT!r})")
    bits, group = meta.get("bits"), meta.get("group_size")
    try:
        check_bits(bits, group)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    modules = meta.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise UserError(f"{path}: 'modules' must be a non-empty list of module names")
    with torch.device("meta"):
        allowed = set(quantizable_modules(FalconMamba(config)))
    bad = sorted(set(modules) - allowed)
    if bad:
        raise UserError(f"{path}: these are not quantizable linear layers of this model: "
                        f"{', '.join(bad[:5])}")
    return meta


def _meta_model(folder: Path, config: ModelConfig):
    """(quantization.json, the model built on the meta device, {name: (shape, dtype)} expected)."""
    meta = read_quantization_json(folder, config)
    bits, group = meta["bits"], meta["group_size"]
    with torch.device("meta"):
        model = FalconMamba(config)
        for name in meta["modules"]:
            lin = model.get_submodule(name)
            _set_module(model, name, QuantLinear(
                lin.in_features, lin.out_features, bits=bits, group_size=group, bias=lin.bias is not None,
                bias_in_forward=not isinstance(lin, DtProj)))
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    return meta, model, want


def quantized_shapes(folder: str | os.PathLike, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a quantized folder must hold, with their shapes (for checks without loading)."""
    return {k: v[0] for k, v in _meta_model(Path(folder), config)[2].items()}


def load_quantized(folder: str | os.PathLike, config: ModelConfig, dtype: torch.dtype,
                   device: torch.device | str) -> FalconMamba:
    """Load a folder written by save_quantized. ``dtype`` applies to the high-precision tensors and
    the activations; quantized tensors keep their stored types. Missing, unexpected, mis-shaped or
    mis-typed tensors raise one UserError naming them."""
    from falcon_mamba.checkpoint import _weight_files, assign_tensors, read_tensors

    folder = Path(folder)
    meta, model, want = _meta_model(folder, config)
    quant_keys = {f"{m}.{b}" for m in meta["modules"] for b in ("qweight", "scales", "zeros")}
    def target_dtype(name, t):
        if name not in quant_keys:
            return torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype
        if t.dtype != want[name][1]:
            return f"{name} is {t.dtype}, expected {want[name][1]}"
        return t.dtype

    tensors = read_tensors(folder, _weight_files(folder), {k: v[0] for k, v in want.items()}, device,
                           config.tie_word_embeddings, target_dtype)
    assign_tensors(model, tensors)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_dtype = dtype
    model.eval()
    model.source = str(folder)
    model.quantization = meta
    return model
