"""Data parallel training on the CPU: 2 processes (gloo, launched by torchrun) give the same losses and
weights as 1 process with the same global batch, with DDP (through the CLI) and with FSDP2 sharding
plus activation checkpointing (through the Python API).

Run as a script, this file is the worker that torchrun starts: ``python -m torch.distributed.run
--standalone --nproc_per_node 2 tests/test_train_distributed.py DATA OUT``.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETS = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
        "model.state_size": 4, "seq_len": 24, "global_batch": 4, "micro_batch": 1, "steps": 5,
        "warmup_steps": 2, "lr": 1e-2, "eval_tokens": 256, "batch_ramp_start": 2, "batch_ramp_steps": 2,
        "batch_ramp_increment": 2}


def _cfg(**kw):
    from falcon_mamba.train import apply_overrides, get_recipe

    return apply_overrides(get_recipe("tiny"), [f"{k}={v}" for k, v in SETS.items()]).replace(**kw)


def _worker(data: str, out: str) -> None:
    import torch.distributed as dist

    from falcon_mamba.cli import main
    from falcon_mamba.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    args = ["train", "--preset", "tiny", "--data", data, "--out", f"{out}/ddp", "--no-progress", *sets]
    assert main(args) == 0
    train(_cfg(parallel="fsdp", activation_checkpointing=True), data, f"{out}/fsdp", progress=False)
    dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    from falcon_mamba.train import train
    from falcon_mamba.train.checkpoint import load_checkpoint
    from falcon_mamba.train.metrics import read_metrics
    from tests.test_data import make_data

    data = make_data(tmp_path, lines=80)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(_cfg(), data, tmp_path / "one", progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", __file__, str(data), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_rows = read_metrics(tmp_path / "one")
    ref_w = load_checkpoint(tmp_path / "one")["model"]
    for kind in ("ddp", "fsdp"):
        rows = read_metrics(tmp_path / kind)
        assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
        for a, b in zip(ref_rows, rows):
            for k in ("loss", "val_loss", "batch", "lr"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (kind, a["step"], k, a[k], b[k])
        ck = load_checkpoint(tmp_path / kind)
        assert ck["world_size"] == 2
        for k, v in ref_w.items():
            diff = (v - ck["model"][k]).abs().max().item()
            assert diff < 1e-5, f"{kind}: {k} differs by {diff}"
    assert single.val_loss is not None


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], sys.argv[2])
