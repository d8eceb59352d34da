"""PEFT LoRA adapter folders: read one onto our model (merged), write our LoRA as one.

A PEFT adapter folder holds ``adapter_config.json`` (r, lora_alpha, target_modules,
base_model_name_or_path, ...) and ``adapter_model.safetensors`` with, per adapted linear layer,
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r); the layer
computes W x + s B A x with s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Module
names are transformers' (``backbone.layers.{i}.mixer.in_proj``), which are ours too.

    model = fm.load_model("tiiuae/falcon-mamba-7b", adapter="my-adapter")   # merged: W += s B A

PEFT and Mamba (checked against peft 0.21): PEFT refuses LoRA on ``out_proj`` and ``conv1d`` for
Mamba models (a ValueError in its injection), and transformers' mixer multiplies by
``dt_proj.weight`` directly, so a PEFT adapter on ``dt_proj`` is silently ignored in
transformers' forward (its lora_B never receives a gradient either) while ``merge_and_unload``
would apply it. Reading: every LoRA layer of the folder is merged, as ``merge_and_unload`` does.
Writing (``falcon-mamba finetune --adapter-only``): only in_proj and x_proj, the targets on which
PeftModel on transformers computes what our model computes; others are refused with the reason.

Only plain LoRA on linear layers is read; DoRA, LoRA biases, embedding LoRA, per-parameter targets
and the like are refused with a UserError naming the field, never merged approximately.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from falcon_mamba.errors import UserError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TARGETS = ("in_proj", "x_proj")  # what --adapter-only adapts by default
# Our LoRA targets PEFT-on-transformers cannot reproduce, and why (the error text).
PEFT_INCOMPATIBLE = {
    "out_proj": "PEFT refuses LoRA on out_proj for Mamba models (peft's _check_lora_target_modules_mamba)",
    "conv1d": "PEFT refuses LoRA on conv1d for Mamba models",
    "dt_proj": "transformers' mixer multiplies by dt_proj.weight directly, so PEFT's adapter on "
               "dt_proj would be silently ignored there",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
# PEFT also saves a target's full base weight when it counts as an embedding layer (lm_head):
# loading puts it back under the adapter, so it replaces the base weight here too.
_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
# Config fields that change what the adapter computes beyond W + s B A: refused when set.
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "fan_in_fan_out": "fan_in_fan_out",
                "target_parameters": "per-parameter targets", "layer_replication": "layer replication",
                "trainable_token_indices": "trainable tokens", "use_qalora": "QALoRA",
                "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "activated LoRA",
                "modules_to_save": "fully trained modules (modules_to_save)"}


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise UserError(f"{folder}: no such adapter folder (a PEFT adapter folder holds {CONFIG_NAME} "
                        f"and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: not a PEFT adapter folder ({CONFIG_NAME} is missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{path}: a {cfg.get('peft_type')!r} adapter; only LoRA adapters can be merged")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            raise UserError(f"{path}: {what} ({field}) is not supported; only plain LoRA on linear "
                            "layers can be merged")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={cfg['bias']!r} adapters train biases too; only bias='none' "
                        "can be merged")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise UserError(f"{path}: needs an integer r >= 1 and a numeric lora_alpha")
    return cfg


def base_name(ref: str | os.PathLike | None) -> str | None:
    """The model name a reference points at: the last part of a Hub id or folder (a Hub cache
    snapshot folder .../models--org--name/snapshots/HASH gives name), lower-cased."""
    if ref is None or str(ref).strip() == "":
        return None
    s = str(ref).rstrip("/\\")
    m = re.search(r"models--[^/\\]+?--([^/\\]+)[/\\]snapshots[/\\]", s + "/")
    return (m.group(1) if m else re.split(r"[/\\]", s)[-1]).lower()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_adapter(model: nn.Module, folder: str | os.PathLike, base_ref: str | os.PathLike | None = None,
                 check_base_name: bool = True) -> list[str]:
    """Merge the PEFT LoRA adapter in ``folder`` into ``model`` (in place): W += s B A, computed
    in fp32 and rounded once to W's dtype. Returns the merged module names.

    UserError when the adapter is not for this base: a module it adapts is missing or has other
    shapes, or (check_base_name) its base_model_name_or_path names another model than
    ``base_ref`` (compared by last path part; pass check_base_name=False when the same model is
    stored under another name)."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    cfg = _read_config(folder)
    theirs, ours = base_name(cfg.get("base_model_name_or_path")), base_name(base_ref)
    if check_base_name and theirs and ours and theirs != ours:
        raise UserError(f"{folder}: the adapter was made for {cfg['base_model_name_or_path']!r}, not "
                        f"{str(base_ref)!r}; load it onto its base model (or pass check_base_name=False "
                        "if this is the same model under another name)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").exists()
        extra = " (pickle adapter_model.bin files are never loaded)" if pickled else ""
        raise UserError(f"{folder}: {WEIGHTS_NAME} is missing{extra}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                m, b = _KEY.match(key), _BASE_KEY.match(key)
                if b is not None:
                    base_weights[b["module"]] = f.get_tensor(key)
                    continue
                if m is None or "lora_embedding" in key:
                    raise UserError(f"{weights}: tensor {key} is not a LoRA A/B weight of a linear layer; "
                                    "only plain LoRA adapters can be merged")
                pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except UserError:
        raise
    except Exception as e:  # SafetensorError, OSError
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    if not pairs:
        raise UserError(f"{weights}: holds no LoRA weights")
    modules = dict(model.named_modules())
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    plan = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights}: {name} has lora_{''.join(ab)} without its pair")
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            what = "is not a linear layer" if mod is not None else "does not exist"
            raise UserError(f"{folder}: the adapter adapts {name}, which {what} in this base model; "
                            "it was made for another model")
        if tied and name == "lm_head":
            raise UserError(f"{folder}: the adapter adapts lm_head, which this base ties to the "
                            "embeddings; merging would change the embeddings too")
        A, B = ab["A"], ab["B"]
        out_f, in_f = mod.weight.shape
        full = base_weights.pop(name, None)
        if full is not None and tuple(full.shape) != (out_f, in_f):
            raise UserError(f"{folder}: the adapter's copy of {name}'s weight has shape "
                            f"{tuple(full.shape)}, this base's is ({out_f}, {in_f}): the adapter is for "
                            "another model")
        fits = A.dim() == B.dim() == 2 and A.shape[1] == in_f and B.shape[0] == out_f
        if not fits or A.shape[0] != B.shape[1]:
            raise UserError(f"{folder}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                            f"which do not fit its weight ({out_f}, {in_f}): the adapter is for another "
                            "model")
        r = A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        plan.append((name, mod, A, B, scale, full))
    if base_weights:
        raise UserError(f"{weights}: base weights of {', '.join(sorted(base_weights))} without LoRA "
                        "weights; only plain LoRA adapters can be merged")
    with torch.no_grad():  # all checks passed: only now change the model
        for _, mod, A, B, scale, full in plan:
            w = mod.weight
            base = w.float() if full is None else full.float().to(w.device)
            w.copy_((base + scale * (B.float() @ A.float()).to(w.device)).to(w.dtype))
    return [p[0] for p in plan]


def check_peft_targets(targets: tuple[str, ...] | str) -> tuple[str, ...]:
    """The LoRA targets an adapter-only export may use; UserError for the ones PEFT cannot load
    onto transformers' model with the same result."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    bad = [t for t in targets if t in PEFT_INCOMPATIBLE]
    if bad:
        reasons = "; ".join(f"{t}: {PEFT_INCOMPATIBLE[t]}" for t in bad)
        raise UserError(f"an adapter-only export cannot adapt {', '.join(bad)} ({reasons}); use "
                        f"--set lora_targets={','.join(PEFT_TARGETS)}")
    return targets


def save_adapter(lora_state: dict[str, dict[str, torch.Tensor]], out: str | os.PathLike, *, rank: int,
                 alpha: float, base_model_name_or_path: str | None) -> Path:
    """Write a PEFT LoRA adapter folder. lora_state: {module name: {"A": (r, in), "B": (out, r)}},
    module names as in the HF checkpoint. Written beside ``out`` and renamed into place."""
    import shutil

    from safetensors.torch import save_file

    from falcon_mamba.atomic import replace_dir, temp_dir_beside

    if not lora_state:
        raise UserError("the model has no LoRA weights to write as an adapter")
    targets = sorted({name.rsplit(".", 1)[-1] for name in lora_state})
    check_peft_targets(tuple(targets))
    tensors = {}
    for name, ab in lora_state.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = ab["A"].detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = ab["B"].detach().float().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    out = Path(out)
    tmp = temp_dir_beside(out)
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def lora_state_from(model_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our LoRA's A/B from a state dict of a model with falcon_mamba.lora applied (parametrization
    names ``<module>.parametrizations.weight.0.A``) -> {module name: {"A", "B"}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in model_state.items():
        m = re.match(r"^(?P<module>.+)\.parametrizations\.weight\.0\.(?P<ab>[AB])$", key)
        if m:
            out.setdefault(m["module"], {})[m["ab"]] = t
    return out
