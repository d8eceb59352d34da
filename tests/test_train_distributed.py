"""Data parallel training on the CPU with real torch.distributed (gloo, processes started by torchrun):

- 2 processes give the losses and weights of 1 process with the same global batch (DDP through the
  CLI; FSDP2 with activation checkpointing; FSDP2 under bf16 with its mixed-precision units), and
  each process trains on its own disjoint rows, which together are the 1-process batch;
- gradient accumulation reduces once per step (counted), with the result of reducing after every
  micro-batch;
- a sharded checkpoint saved by 2 processes resumes on 1 and on 3, continuing the 1-process curve.

Run as a script, this file is the worker that torchrun starts: ``python -m torch.distributed.run
--standalone --nproc_per_node N tests/test_train_distributed.py MODE DATA OUT``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The global batch ramps 6 -> 12 rows (splits over 1, 2 and 3 processes); micro-batches of 2 rows
# make each 2-process step 2 or 3 micro-batches (the last one shorter).
SETS = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
        "model.state_size": 4, "seq_len": 24, "global_batch": 12, "micro_batch": 2, "steps": 5,
        "warmup_steps": 2, "lr": 1e-2, "eval_tokens": 256, "batch_ramp_start": 6, "batch_ramp_steps": 2,
        "batch_ramp_increment": 6, "peak_tflops": 1.0}
STOP = 2  # the sharded checkpoint the resume tests start from


def _cfg(**kw):
    from falcon_mamba.train import apply_overrides, get_recipe

    return apply_overrides(get_recipe("tiny"), [f"{k}={v}" for k, v in SETS.items()]).replace(**kw)


def _quiet():
    return {"progress": False, "log": lambda *a, **k: None}


def _record_rows(rows: list) -> None:
    """Make every training forward pass append its input rows (token lists) to ``rows``."""
    from falcon_mamba.train.objective import LMObjective

    forward = LMObjective.forward

    def recording(self, input_ids_BL, *args, **kw):
        if self.training:
            rows.extend(input_ids_BL.tolist())
        return forward(self, input_ids_BL, *args, **kw)

    LMObjective.forward = recording


def _count_reductions(counts: dict) -> None:
    """Count gradient reductions: DDP's all-reduce buckets (a comm hook on every DDP the loop makes)
    and FSDP2's reduce-scatters (the torch.distributed call it makes, whichever name this torch has)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    import falcon_mamba.train.loop as loop

    wrap = loop.wrap

    def hook(state, bucket):
        counts["ddp_allreduce"] += 1
        return allreduce_hook(state, bucket)

    def counting_wrap(*args, **kw):
        module = wrap(*args, **kw)
        if isinstance(module, DDP):
            module.register_comm_hook(None, hook)
        return module

    loop.wrap = counting_wrap
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        fn = getattr(dist, name, None)
        if fn is not None:
            def counted(*args, _fn=fn, **kw):
                counts["fsdp_reduce_scatter"] += 1
                return _fn(*args, **kw)

            setattr(dist, name, counted)


def _suite(data: str, out: str) -> None:
    """The 2-process runs, each into OUT/<name>; per rank: rows-<rank>.json (the DDP run's rows) and
    counts-<rank>.json (gradient reductions per run)."""
    import torch.distributed as dist

    from falcon_mamba.cli import main
    from falcon_mamba.train import train

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows: list = []
    _record_rows(rows)
    counts = {"ddp_allreduce": 0, "fsdp_reduce_scatter": 0}
    _count_reductions(counts)
    per_run = {}

    def run(name, fn):
        for k in counts:
            counts[k] = 0
        fn()
        per_run[name] = dict(counts)

    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    run("ddp", lambda: main(["train", "--preset", "tiny", "--data", data, "--out", f"{out}/ddp",
                             "--no-progress", *sets]))
    Path(out, f"rows-{rank}.json").write_text(json.dumps(rows))
    rows.clear()
    fsdp = _cfg(parallel="fsdp", activation_checkpointing=True)
    run("ddp_sync", lambda: train(_cfg(sync_every_micro_batch=True), data, f"{out}/ddp_sync", **_quiet()))
    run("fsdp", lambda: train(fsdp, data, f"{out}/fsdp", **_quiet()))
    run("fsdp_sync", lambda: train(fsdp.replace(sync_every_micro_batch=True), data, f"{out}/fsdp_sync",
                                   **_quiet()))
    from falcon_mamba.model import MambaMixer

    seen = set()
    mixer_forward = MambaMixer.forward

    def recording(self, *args, **kw):  # the dtypes the scan's fp32 inputs have inside the forward
        seen.update(f"{n}:{getattr(self, n).dtype}" for n in ("A_log", "D"))
        seen.add(f"dt_bias:{self.dt_proj.bias.dtype}")
        return mixer_forward(self, *args, **kw)

    MambaMixer.forward = recording
    run("fsdp_bf16", lambda: train(fsdp.replace(precision="bf16"), data, f"{out}/fsdp_bf16", **_quiet()))
    MambaMixer.forward = mixer_forward
    per_run["fsdp_bf16_dtypes"] = sorted(seen)
    run("fsdp_stop", lambda: train(fsdp, data, f"{out}/fsdp_stop", stop_at=STOP, **_quiet()))
    Path(out, f"counts-{rank}.json").write_text(json.dumps(per_run))
    dist.destroy_process_group()


def _resume(data: str, out: str) -> None:
    import torch.distributed as dist

    from falcon_mamba.train import train

    dist.init_process_group("gloo")
    train(_cfg(parallel="fsdp", activation_checkpointing=True), data, out, resume=True, **_quiet())
    dist.destroy_process_group()


def _torchrun(n: int, mode: str, data, out) -> None:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(n), __file__, mode, str(data), str(out)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _steps_rows() -> list[int]:
    from falcon_mamba.train.schedule import batch_at

    cfg = _cfg()
    return [batch_at(cfg, s) for s in range(cfg.steps)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process references (fp32 with the rows it trained on; bf16) and the 2-process suite."""
    from falcon_mamba.train import train
    from tests.test_data import make_data

    tmp = tmp_path_factory.mktemp("dist")
    data = make_data(tmp, lines=80)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    from falcon_mamba.train.objective import LMObjective

    forward = LMObjective.forward
    rows: list = []
    try:
        _record_rows(rows)
        train(_cfg(), data, tmp / "one", **_quiet())
        LMObjective.forward = forward
        train(_cfg(precision="bf16"), data, tmp / "one_bf16", **_quiet())
    finally:
        LMObjective.forward = forward
        torch.set_num_threads(n)
    _torchrun(2, "suite", data, tmp)
    return {"tmp": tmp, "data": data, "rows": rows}


def _assert_same_run(ref_dir, run_dir, rtol, what):
    from falcon_mamba.train.checkpoint import load_checkpoint
    from falcon_mamba.train.metrics import read_metrics

    ref_rows, rows = read_metrics(ref_dir), read_metrics(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows], what
    for a, b in zip(ref_rows, rows):
        for k in ("loss", "val_loss", "batch", "lr", "tokens"):
            if k in a:
                assert abs(a[k] - b[k]) <= rtol * max(1.0, abs(a[k])), (what, a["step"], k, a[k], b[k])
    ref_w, w = load_checkpoint(ref_dir)["model"], load_checkpoint(run_dir)["model"]
    assert set(ref_w) == set(w)
    for k, v in ref_w.items():
        diff = (v - w[k]).abs().max().item()
        assert diff <= rtol * max(1.0, v.abs().max().item()), f"{what}: {k} differs by {diff}"


def test_two_processes_match_one(runs):
    from falcon_mamba.train.checkpoint import load_checkpoint
    from falcon_mamba.train.metrics import read_metrics

    tmp = runs["tmp"]
    for kind in ("ddp", "fsdp"):
        _assert_same_run(tmp / "one", tmp / kind, 1e-5, kind)
        assert load_checkpoint(tmp / kind)["world_size"] == 2
        # tokens/s counts every process's tokens; MFU divides by every process's peak
        for a, b in zip(read_metrics(tmp / "one"), read_metrics(tmp / kind)):
            if "mfu" in a:
                assert a["mfu"] / a["tok_s"] == pytest.approx(2 * b["mfu"] / b["tok_s"], rel=1e-9)
    # exported HF folders: the whole model gathered from the shards at the end of the run, and by
    # `train --export-only` in one process from a checkpoint two processes wrote
    import falcon_mamba as fm
    from falcon_mamba.cli import main

    a, b = fm.load_model(tmp / "one" / "model"), fm.load_model(tmp / "fsdp" / "model")
    x = torch.randint(0, a.config.vocab_size, (1, 12))
    assert (a(x)[0] - b(x)[0]).abs().max().item() < 1e-4
    assert main(["train", "--data", str(runs["data"]), "--out", str(tmp / "fsdp_stop"), "--export-only"]) == 0
    exported = fm.load_model(tmp / "fsdp_stop" / "model").state_dict()
    saved = load_checkpoint(tmp / "fsdp_stop")["model"]
    assert set(exported) == set(saved) and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_fsdp_mixed_precision_matches_bf16_autocast(runs):
    """FSDP2's bf16 units (in_proj, out_proj gathered in bf16, reduced in fp32) round as bf16
    autocast does on one process: the first step is identical; later ones differ as little as two
    bf16 runs whose inputs differ in the last bits (fp32 sums in another order), and the trained
    weights much less than fp32 and bf16 differ. A_log, D and the dt bias reach the scan in fp32;
    the master weights stay fp32. (At this size the later steps' losses of fp32 and bf16 are
    themselves only ~1e-4 apart, so their bound below is loose; the first step and the weights
    carry the claim. Under torch 2.13 on a CPU the fifth step's loss differed by 1.03e-4 x loss.)"""
    from falcon_mamba.train.checkpoint import load_checkpoint
    from falcon_mamba.train.metrics import read_metrics

    tmp = runs["tmp"]
    ref, run = read_metrics(tmp / "one_bf16"), read_metrics(tmp / "fsdp_bf16")
    assert ref[0]["loss"] == run[0]["loss"]
    for a, b in zip(ref, run):
        k = "loss" if "loss" in a else "val_loss"
        assert abs(a[k] - b[k]) <= 3e-4 * a[k], (a["step"], k, a[k], b[k])
    w16, w32 = load_checkpoint(tmp / "one_bf16")["model"], load_checkpoint(tmp / "one")["model"]
    w = load_checkpoint(tmp / "fsdp_bf16")["model"]
    assert all(v.dtype == torch.float32 for v in w.values())

    def dist(a, b):
        return sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5

    assert dist(w, w16) < 0.5 * dist(w32, w16), (dist(w, w16), dist(w32, w16))
    for r in range(2):
        c = json.loads((tmp / f"counts-{r}.json").read_text())
        assert c["fsdp_bf16_dtypes"] == ["A_log:torch.float32", "D:torch.float32", "dt_bias:torch.float32"]


def test_each_process_trains_its_own_rows_of_the_same_global_batch(runs):
    ref = runs["rows"]
    ranks = [json.loads((runs["tmp"] / f"rows-{r}.json").read_text()) for r in range(2)]
    sizes = _steps_rows()
    assert len(ref) == sum(sizes) and [len(r) for r in ranks] == [sum(sizes) // 2] * 2
    lo = 0
    for s, b in enumerate(sizes):
        step = ref[lo:lo + b]
        mine = [r[lo // 2:(lo + b) // 2] for r in ranks]
        assert mine[0] + mine[1] == step, f"step {s}: the two shares are not the 1-process batch"
        assert not {tuple(x) for x in mine[0]} & {tuple(x) for x in mine[1]}, f"step {s}: shared rows"
        lo += b


def test_gradient_accumulation_reduces_once_per_step(runs):
    """Without a reduction per micro-batch (DDP no_sync, FSDP2 set_requires_gradient_sync) the run
    ends where reducing every micro-batch ends, with one reduction per step instead of one per
    micro-batch."""
    tmp = runs["tmp"]
    cfg = _cfg()
    micros = sum(-(-(b // 2) // cfg.micro_batch) for b in _steps_rows())  # per process
    assert micros > cfg.steps
    units = 1 + cfg.model.num_hidden_layers  # FSDP2: a unit per mixer and the root
    for r in range(2):
        c = json.loads((tmp / f"counts-{r}.json").read_text())
        buckets = c["ddp"]["ddp_allreduce"] // cfg.steps
        assert buckets >= 1 and c["ddp"]["ddp_allreduce"] == buckets * cfg.steps, c["ddp"]
        assert c["ddp_sync"]["ddp_allreduce"] == buckets * micros, c["ddp_sync"]
        assert c["fsdp"]["fsdp_reduce_scatter"] == units * cfg.steps, c["fsdp"]
        assert c["fsdp_sync"]["fsdp_reduce_scatter"] == units * micros, c["fsdp_sync"]
        # bf16: in_proj and out_proj are units of their own
        assert c["fsdp_bf16"]["fsdp_reduce_scatter"] == (units + 2 * cfg.model.num_hidden_layers) * cfg.steps
    _assert_same_run(tmp / "ddp_sync", tmp / "ddp", 1e-5, "ddp no_sync")
    _assert_same_run(tmp / "fsdp_sync", tmp / "fsdp", 1e-5, "fsdp no sync")


@pytest.mark.parametrize("processes", [1, 3])
def test_sharded_checkpoint_resumes_on_another_process_count(runs, processes):
    """FSDP2 shards saved by 2 processes at step 2, resumed by 1 (in this process) or by 3: the run
    goes on as the uninterrupted 1-process run."""
    from falcon_mamba.train import train
    from falcon_mamba.train.checkpoint import load_checkpoint, load_train_state

    tmp = runs["tmp"]
    run = tmp / f"resume{processes}"
    shutil.copytree(tmp / "fsdp_stop", run)
    saved = load_train_state(run)
    assert saved["step"] == STOP and saved["world_size"] == 2
    shards = sorted(p.name for p in saved["folder"].glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    if processes == 1:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(_cfg(parallel="fsdp", activation_checkpointing=True), runs["data"], run, resume=True,
                  **_quiet())
        finally:
            torch.set_num_threads(n)
    else:
        _torchrun(processes, "resume", runs["data"], run)
    assert load_checkpoint(run)["world_size"] == processes
    _assert_same_run(tmp / "one", run, 1e-5, f"resumed on {processes}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    {"suite": _suite, "resume": _resume}[sys.argv[1]](sys.argv[2], sys.argv[3])
