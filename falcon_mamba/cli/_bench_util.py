"""Shared pieces of `falcon-mamba bench`: environment record, timers, memory, model builders.

Models are built with random weights directly on the target device (a 7B model never touches
host memory): ours, transformers' FalconMambaForCausalLM, and a Mistral-7B-shaped transformer with
the vocabulary resized to Falcon Mamba's 65,024 (the paper's comparison).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024 ** 3


def env_record(device: torch.device) -> dict:
    """GPU, commit and versions: every result file carries these."""
    rec = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for mod in ("triton", "transformers"):
        try:
            rec[mod] = __import__(mod).__version__
        except ImportError:
            rec[mod] = None
    # A copy of the tree without .git (a lent GPU machine) names its commit in FALCON_MAMBA_COMMIT.
    rec["commit"] = os.environ.get("FALCON_MAMBA_COMMIT") or None
    if rec["commit"] is None:
        try:
            root = Path(__file__).resolve().parents[2]
            rec["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            rec["dirty"] = bool(dirty)
        except (OSError, subprocess.SubprocessError):
            pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rec["gpu_memory_gib"] = round(p.total_memory / GIB, 1)
        rec["sms"] = p.multi_processor_count
    return rec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_bytes: int | None):
    """Cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), as a smaller card
    would; the cap covers the weights too."""
    if cap_bytes is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    free_memory(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), idx)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, idx)
        free_memory(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_ceilings(device: torch.device) -> dict:
    """The two measured ceilings: device copy bandwidth (read + write counted) and bf16 matmul rate."""
    if device.type != "cuda":
        return {"copy_bytes_per_s": None, "matmul_flop_per_s": None}
    n = 1 << 30  # 1 GiB buffers: far above L2
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, reps=9, warmup=2)
    copy = 2 * n / t
    a = b = None  # free before the matmul
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t = timed(lambda: x @ y, device, reps=9, warmup=2)
    x = y = None
    free_memory(device)
    return {"copy_bytes_per_s": copy, "matmul_flop_per_s": 2 * m ** 3 / t}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_ours(config, dtype: torch.dtype, device: torch.device):
    """Our model with random weights, created on the device in the target dtype."""
    from falcon_mamba.model import FalconMamba

    with torch.device(device), _default_dtype(dtype):
        model = FalconMamba(config)
    return model.to_dtype(dtype).eval().requires_grad_(False)


def hf_falcon_mamba_config(config):
    from transformers import FalconMambaConfig

    return FalconMambaConfig(**{k: v for k, v in config.to_hf_dict().items()
                                if k not in ("architectures", "model_type")})


def build_hf_falcon_mamba(config, dtype: torch.dtype, device: torch.device):
    """transformers' FalconMambaForCausalLM, random weights, on the device."""
    from transformers import FalconMambaForCausalLM

    with torch.device(device), _default_dtype(dtype):
        model = FalconMambaForCausalLM(hf_falcon_mamba_config(config))
    return model.to(dtype).eval().requires_grad_(False)


def mistral_config(vocab_size: int, small: bool = False):
    """Mistral-7B's shapes (32 layers, 4096 hidden, 14336 MLP, 32 heads, 8 KV heads) with the
    vocabulary resized to ``vocab_size``; ``small`` gives a tiny one for CPU smoke runs."""
    from transformers import MistralConfig

    if small:
        return MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1 << 21, sliding_window=None)
    return MistralConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=1 << 21, sliding_window=None, rope_theta=1e6)


def build_mistral(vocab_size: int, dtype: torch.dtype, device: torch.device, small: bool = False):
    from transformers import MistralForCausalLM

    cfg = mistral_config(vocab_size, small)
    cfg._attn_implementation = "sdpa"
    with torch.device(device), _default_dtype(dtype):
        model = MistralForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def nbytes_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def section(results: dict, name: str, fn, log) -> None:
    """Run one benchmark section; a failure is recorded in the results, not fatal to the rest."""
    t0 = time.perf_counter()
    log(f"== {name}")
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark run must record what it could
        import traceback

        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results.setdefault("_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    log(f"   {name} done in {time.perf_counter() - t0:.1f} s")
