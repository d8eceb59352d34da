"""HF-format checkpoints: config.json + model.safetensors (or shards with an index), in and out.

Loading builds the model on the meta device and assigns tensors read through safetensors' mmap, one
tensor at a time and cast straight to the requested dtype and device, so a 7B checkpoint never sits
twice in memory. Only safetensors are read: a pickle is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from falcon_mamba.atomic import replace_dir, temp_dir_beside
from falcon_mamba.config import ModelConfig
from falcon_mamba.dtypes import check_device_dtype, parse_dtype
from falcon_mamba.errors import UserError
from falcon_mamba.hub import resolve_model_dir
from falcon_mamba.model import FP32_PARAM_SUFFIXES, FalconMamba

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{index}: damaged index ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise UserError(f"{index}: damaged index (weight_map must map tensor names to file names)")
        files = {}
        real = folder.resolve()
        for name, fname in weight_map.items():
            f = folder / fname
            # A shard is a file of this folder: never a path that reads elsewhere (../, /abs).
            if Path(fname).is_absolute() or f.resolve().parent != real:
                raise UserError(f"{index}: shard {fname!r} is not a file of this folder")
            files[name] = f
        for f in set(files.values()):
            if not f.is_file():
                raise UserError(f"{f}: shard named in {INDEX_NAME} is missing")
        return files
    single = folder / SINGLE_NAME
    if single.is_file():

        with _open(single) as f:
            return {name: single for name in f.keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise UserError(f"{folder}: only pickle weights (.bin/.pt) found; they are never loaded for "
                        "safety. Convert them to safetensors first")
    raise UserError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


class _open:
    """safe_open with errors that name the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        from safetensors import safe_open

        try:
            self.f = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError: the file is truncated or not safetensors
            raise UserError(f"{self.path}: not a readable safetensors file ({e})") from None
        return self.f.__enter__()

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def expected_shapes(model: FalconMamba) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys a model needs, with their shapes (lm_head omitted when tied)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def load_model(ref: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
               device: torch.device | str = "cpu", adapter: str | os.PathLike | None = None,
               check_adapter_base: bool = True) -> FalconMamba:
    """Load an HF-format folder or Hub id into a FalconMamba in eval mode.

    dtype applies to the weights; A_log, D and the dt bias stay fp32. Missing, unexpected or
    mis-shaped tensors raise one UserError naming them all. ``adapter``: a PEFT LoRA adapter
    folder (adapter_config.json + adapter_model.safetensors), merged into the weights
    (falcon_mamba.hf.adapter); an adapter made for another base is a UserError
    (``check_adapter_base=False`` skips the comparison of base names, not of shapes).
    """
    dtype = parse_dtype(dtype)
    device = check_device_dtype(device, dtype)
    folder = resolve_model_dir(ref)
    config = ModelConfig.from_json_file(folder / "config.json")
    quant = folder / "quantization.json"
    if quant.is_file() and adapter is not None:
        raise UserError(f"{folder} is quantized; merge the adapter into the high-precision model "
                        "(load_model(base, adapter=...), save_model), then quantize that")
    if quant.is_file():
        from falcon_mamba import quant as quant_mod  # a quantized folder has its own loader

        return quant_mod.load_quantized(folder, config, dtype, device)
    files = _weight_files(folder)
    if not config.tie_word_embeddings and "lm_head.weight" not in files and _tie_unstated(folder):
        # transformers 4.x leaves tie_word_embeddings out of config.json when it holds its default
        # (true) and then stores no lm_head: such a folder is a tied model
        config = config.replace(tie_word_embeddings=True)
    with torch.device("meta"):
        model = FalconMamba(config)
    want = expected_shapes(model)
    tensors = read_tensors(
        folder, files, want, device, config.tie_word_embeddings,
        lambda name, t: torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype)
    assign_tensors(model, tensors)
    if adapter is not None:
        from falcon_mamba.hf.adapter import load_adapter

        load_adapter(model, adapter, base_ref=ref, check_base_name=check_adapter_base)
    model.eval()
    model.source = str(folder)
    return model


def _tie_unstated(folder: Path) -> bool:
    """Whether config.json leaves tie_word_embeddings unsaid (ModelConfig then reads Falcon Mamba as
    untied, the 7B's setting)."""
    return "tie_word_embeddings" not in json.loads((folder / "config.json").read_text())


def stored_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The dtype of the embeddings in a checkpoint folder (what "as stored" means), None when the
    folder has no embeddings tensor."""
    folder = Path(folder)
    path = _weight_files(folder).get("backbone.embeddings.weight")
    if path is None:
        return None
    with _open(path) as f:
        code = f.get_slice("backbone.embeddings.weight").get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(code)


def check_folder(ref: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """Everything load_model checks, without reading the weights: config.json, the weight files'
    headers, every tensor's name, shape and dtype. Returns (folder, config); UserError otherwise."""
    folder = resolve_model_dir(ref)
    config = ModelConfig.from_json_file(folder / "config.json")
    quantized = (folder / "quantization.json").is_file()
    files = _weight_files(folder)
    if (not quantized and not config.tie_word_embeddings and "lm_head.weight" not in files
            and _tie_unstated(folder)):  # as load_model: a transformers 4.x tied folder
        config = config.replace(tie_word_embeddings=True)
    if quantized:
        from falcon_mamba.quant.folder import quantized_shapes

        want = quantized_shapes(folder, config)
    else:
        with torch.device("meta"):
            want = expected_shapes(FalconMamba(config))
    problems, by_file = _match(files, want, config.tie_word_embeddings)
    for path, keys in by_file.items():
        with _open(path) as f:
            for name in keys:
                sl = f.get_slice(name)
                shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                if shape != want[name]:
                    problems.append(f"{name} has shape {shape}, expected {want[name]}")
                elif dt not in ("F32", "BF16", "F16") and not quantized:
                    problems.append(f"{name} is {dt}, not a float dtype")
    if problems:
        raise UserError(f"{folder}: checkpoint does not fit the config: {'; '.join(problems)}")
    return folder, config


def _match(files: dict[str, Path], want: dict[str, tuple[int, ...]],
           tied: bool) -> tuple[list[str], dict[Path, list[str]]]:
    """The stored tensor names against the wanted ones: (problems: missing / unexpected names, the
    wanted names present grouped by file). A tied model's stored lm_head is ignored (some writers
    store the tied head too)."""
    names = set(files) - ({"lm_head.weight"} if tied else set())
    problems = []
    missing, unexpected = sorted(set(want) - names), sorted(names - set(want))
    if missing:
        problems.append(f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name in want:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    return problems, by_file


def read_tensors(folder: Path, files: dict[str, Path], want: dict[str, tuple[int, ...]],
                 device: torch.device, tied: bool, target_dtype) -> dict[str, torch.Tensor]:
    """Read the tensors named in ``want`` (name -> shape) from their files, each cast to
    ``target_dtype(name, tensor)`` on device, one at a time through mmap. target_dtype may return a
    string instead of a dtype: a problem with that tensor. Every missing, unexpected, mis-shaped or
    refused tensor is collected and reported in one UserError."""
    problems, by_file = _match(files, want, tied)
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with _open(path) as f:
            for name in keys:
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise UserError(f"{path}: tensor {name} cannot be read ({e})") from None
                if tuple(t.shape) != want[name]:
                    problems.append(f"{name} has shape {tuple(t.shape)}, expected {want[name]}")
                    continue
                target = target_dtype(name, t)
                if isinstance(target, str):
                    problems.append(target)
                    continue
                tensors[name] = t.to(device=device, dtype=target)
    if problems:
        raise UserError(f"{folder}: checkpoint does not fit the config: {'; '.join(problems)}")
    return tensors


def assign_tensors(model: FalconMamba, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors into a meta-built model (strict), re-tying the head when tied."""
    tied = model.config.tie_word_embeddings
    if tied:
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.backbone.embeddings.weight


MAX_SIZE = 1 << 60  # bytes: an exbibyte; a larger size is a typo


def _parse_size(size: int | str) -> int:
    """'4GiB', '512MB', '1e3KiB', '1024' -> bytes. ValueError for anything else, for NaN and
    infinite values, and for sizes over MAX_SIZE."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        s = str(size).strip().upper()
        mult = 1
        for unit, m in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 10**9),
                        ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if s.endswith(unit):
                s, mult = s[: -len(unit)].strip(), m
                break
        if len(s) > 40:
            raise ValueError(f"cannot read {size!r} as a size")
        f = float(s)  # ValueError for junk
        if f != f or abs(f) == float("inf") or abs(f) * mult > MAX_SIZE:
            raise ValueError(f"size {size!r} is out of range")
        n = int(f * mult)
    if abs(n) > MAX_SIZE:
        raise ValueError(f"size {size!r} is out of range")
    return n


def save_model(model: FalconMamba, out: str | os.PathLike,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
               tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write the model as an HF folder that transformers' from_pretrained loads.

    Above max_shard_size the weights are split into model-0000i-of-0000n.safetensors with an index.
    The folder is written next to its destination and renamed into place, so a crash never leaves
    a half-written checkpoint where a good one was.
    """
    from safetensors.torch import save_file

    out = Path(out)
    limit = _parse_size(max_shard_size)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    tmp = temp_dir_beside(out)
    try:
        model.config.write_json(tmp / "config.json")
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_NAME, metadata=meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, tmp / fname, metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer_dir is not None:
            for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "chat_template.jinja"):
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
