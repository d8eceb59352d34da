"""Training recipe: config overrides, schedules, optimizer groups, init, document resets, the loop,
checkpoints (resume, kill mid-save, config mismatch) and export."""

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import falcon_mamba as fm
from falcon_mamba.errors import UserError
from falcon_mamba.train import apply_overrides, get_recipe, train
from falcon_mamba.train.checkpoint import load_checkpoint, read_tensors
from falcon_mamba.train.metrics import read_metrics
from falcon_mamba.train.objective import LMObjective
from falcon_mamba.train.optim import param_groups
from falcon_mamba.train.schedule import batch_at, lr_at, schedule_factor
from tests.helpers import assert_close
from tests.test_data import make_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CI machine has 2 cores; tiny models run fastest without intra-op threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("d"), lines=150)


def tiny_cfg(**kw):
    base = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
            "model.state_size=4", "seq_len=24", "global_batch=4", "micro_batch=2", "steps=8",
            "warmup_steps=2", "lr=3e-3", "eval_tokens=256"]
    cfg = apply_overrides(get_recipe("tiny"), base)
    return cfg.replace(**kw)


# ---- config ---------------------------------------------------------------------------------
def test_set_overrides_are_type_checked():
    cfg = apply_overrides(get_recipe("tiny"), ["lr=1e-3", "steps=1e3", "model.hidden_size=96",
                                               "activation_checkpointing=true", "mixture=a=1,b=2"])
    assert cfg.lr == 1e-3 and cfg.steps == 1000 and cfg.model.hidden_size == 96
    assert cfg.activation_checkpointing is True and cfg.mixture == "a=1,b=2"
    for bad, msg in [("lrr=1", "unknown training field"), ("model.hidden=3", "unknown model field"),
                     ("steps=1.5", "expected an integer"), ("lr=fast", "expected a number"),
                     ("activation_checkpointing=maybe", "true or false"), ("steps", "key=value"),
                     ("schedule=linear", "schedule must be one of")]:
        with pytest.raises(UserError, match=msg):
            apply_overrides(get_recipe("tiny"), [bad])
    with pytest.raises(UserError, match="unknown training preset"):
        get_recipe("huge")


# ---- schedules ------------------------------------------------------------------------------
def test_wsd_schedule_shape():
    cfg = get_recipe("tiny").replace(steps=100, warmup_steps=10, lr=1.0, decay_fraction=0.2,
                                     min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:80])  # stable
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))  # decaying
    assert lrs[99] == pytest.approx(0.1)
    exp = cfg.replace(decay_shape="exp", min_lr_ratio=1 / 256)
    assert lr_at(exp, 99) == pytest.approx(1 / 256)
    assert lr_at(exp, 89) == pytest.approx((1 / 256) ** 0.5)  # geometric midpoint
    with pytest.raises(UserError, match="min_lr_ratio > 0"):
        cfg.replace(decay_shape="exp", min_lr_ratio=0.0)


def test_cosine_schedule():
    cfg = get_recipe("tiny").replace(schedule="cosine", steps=110, warmup_steps=10, lr=2.0, min_lr_ratio=0.0)
    assert schedule_factor(cfg, 10) == pytest.approx(1.0)
    assert schedule_factor(cfg, 60) == pytest.approx(0.5)
    assert schedule_factor(cfg, 110) == pytest.approx(0.0, abs=1e-12)


def test_batch_ramp_and_lr_scaling():
    cfg = get_recipe("tiny").replace(global_batch=64, batch_ramp_start=16, batch_ramp_steps=100,
                                     batch_ramp_increment=8, warmup_steps=0, lr=1.0, steps=1000)
    sizes = [batch_at(cfg, s) for s in range(120)]
    assert sizes[0] == 16 and sizes[50] == 40 and sizes[100] == 64 and sizes[-1] == 64
    assert all(b % 8 == 0 for b in sizes) and sizes == sorted(sizes)
    assert lr_at(cfg, 0) == pytest.approx(math.sqrt(16 / 64))
    assert lr_at(cfg.replace(ramp_lr_scaling="linear"), 0) == pytest.approx(16 / 64)
    assert lr_at(cfg.replace(ramp_lr_scaling="none"), 0) == pytest.approx(1.0)
    assert lr_at(cfg, 200) == pytest.approx(1.0)


# ---- optimizer groups and init -----------------------------------------------------------------
def test_no_weight_decay_on_A_log_D_biases_norms_embeddings():
    model = fm.FalconMamba(fm.ModelConfig(hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                                          vocab_size=64, use_bias=True))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    name_of = {id(p): n for n, p in model.named_parameters()}
    keep = {name_of[id(p)] for p in groups["no_decay"]["params"]}
    decay = {name_of[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    for n in name_of.values():
        leaf = n.split(".")[-1]
        if (leaf in ("A_log", "D", "bias") or "norm" in n or "embeddings" in n):
            assert n in keep, n
        else:
            assert n in decay, n
    assert "backbone.layers.0.mixer.in_proj.weight" in decay and "lm_head.weight" in decay
    assert "backbone.layers.1.mixer.conv1d.bias" in keep and "backbone.layers.0.mixer.A_log" in keep


def test_initialisation_as_the_reference():
    c = fm.ModelConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=300, vocab_size=64,
                       state_size=8)
    model = fm.FalconMamba(c)
    for blk in model.backbone.layers:
        m = blk.mixer
        dt = F.softplus(m.dt_proj.bias)  # inverse softplus at init: softplus(bias) = the drawn dt
        assert dt.min() >= c.time_step_min * 0.999 and dt.max() <= c.time_step_max * 1.001
        assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
        assert torch.allclose(m.A_log, torch.log(torch.arange(1, 9.0)).expand(300, -1))
        assert torch.all(m.D == 1)
        bound = c.time_step_rank ** -0.5
        assert m.dt_proj.weight.abs().max() <= bound


# ---- packed sequences: no information crosses a document boundary ---------------------------
def test_no_information_crosses_a_document_boundary(rng):
    cfg = fm.get_preset("tiny-odd")
    model = fm.FalconMamba(cfg)
    a = torch.randint(0, cfg.vocab_size, (1, 13), generator=rng)
    b = torch.randint(0, cfg.vocab_size, (1, 9), generator=rng)
    packed = torch.cat([a, b], 1)
    reset = torch.zeros(1, 22, dtype=torch.bool)
    reset[0, 13] = True
    logits_packed, _ = model(packed, reset_BL=reset)
    logits_b, _ = model(b)
    logits_a, _ = model(a)
    assert_close(logits_packed[:, 13:], logits_b, 6e-4, 2e-3, "doc 2 packed vs alone")
    assert_close(logits_packed[:, :13], logits_a, 6e-4, 2e-3, "doc 1 packed vs alone")
    # and without the reset the second document does see the first
    assert (model(packed)[0][:, 13:] - logits_b).abs().max() > 1e-3
    # gradients: the loss on doc 2 has no gradient w.r.t. doc 1's embeddings
    emb = model.backbone.embeddings
    emb.weight.grad = None
    logits, _ = model(packed, reset_BL=reset)
    logits[:, 13:].sum().backward()
    used_only_by_a = set(a[0].tolist()) - set(b[0].tolist())
    g = emb.weight.grad
    assert all(g[i].abs().max() == 0 for i in used_only_by_a)


def test_objective_counts_only_masked_targets(rng):
    model = fm.FalconMamba(fm.get_preset("tiny"))
    obj = LMObjective(model)
    x = torch.randint(0, 512, (2, 11), generator=rng)
    mask = torch.rand(2, 10, generator=rng) > 0.5
    reset = torch.zeros(2, 10, dtype=torch.bool)
    got = obj(x[:, :-1], x[:, 1:], reset, mask)
    logits, _ = model(x[:, :-1])
    want = F.cross_entropy(logits[mask], x[:, 1:][mask], reduction="sum")
    assert_close(got, want, 1e-5, 1e-5, "masked loss")


# ---- the loop ---------------------------------------------------------------------------------
def test_train_learns_and_exports_a_loadable_model(data_dir, tmp_path):
    cfg = tiny_cfg(steps=30, lr=1e-2, warmup_steps=3, eval_every=15)
    res = train(cfg, data_dir, tmp_path / "run", progress=False, log=lambda *a: None)
    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [15, 30] and vals[1]["val_loss"] < vals[0]["val_loss"]
    assert res.val_bpb == pytest.approx(vals[1]["val_bpb"]) and 0 < res.val_bpb < 10
    assert {"loss", "lr", "tok_s", "mfu", "grad_norm", "batch", "tokens"} <= set(rows[0])
    # the exported folder is an ordinary model: same logits as the checkpoint's weights
    model = fm.load_model(res.model_dir)
    assert (res.model_dir / "tokenizer.json").is_file()
    payload = load_checkpoint(tmp_path / "run")
    ref = fm.FalconMamba(res.config.model)
    ref.load_state_dict({k.removeprefix("model."): v for k, v in payload["model"].items()})
    x = torch.randint(0, res.config.model.vocab_size, (1, 12))
    assert torch.equal(model(x)[0], ref(x)[0])


def test_resume_reproduces_the_uninterrupted_loss_curve(data_dir, tmp_path):
    cfg = tiny_cfg(steps=10, save_every=0, log_every=3, global_batch=4, batch_ramp_start=2,
                   batch_ramp_steps=4, batch_ramp_increment=2)
    quiet = {"progress": False, "log": lambda *a: None}
    whole = train(cfg, data_dir, tmp_path / "whole", **quiet)
    part = train(cfg, data_dir, tmp_path / "part", stop_at=4, **quiet)
    assert part.steps == 4 and load_checkpoint(tmp_path / "part")["step"] == 4
    with pytest.raises(UserError, match="--resume"):
        train(cfg, data_dir, tmp_path / "part", **quiet)
    rest = train(cfg, data_dir, tmp_path / "part", resume=True, **quiet)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "val_loss", "lr", "batch", "tokens"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    assert rest.val_loss == pytest.approx(whole.val_loss, rel=1e-6)
    wa = load_checkpoint(tmp_path / "whole")["model"]
    wb = load_checkpoint(tmp_path / "part")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k


def test_resume_refuses_another_config(data_dir, tmp_path):
    cfg = tiny_cfg(steps=4)
    train(cfg, data_dir, tmp_path / "r", stop_at=2, progress=False, log=lambda *a: None)
    other = apply_overrides(cfg, ["model.num_hidden_layers=3", "lr=1e-3"])
    with pytest.raises(UserError, match=r"another config.*lr .*model\.num_hidden_layers"):
        train(other, data_dir, tmp_path / "r", resume=True, progress=False, log=lambda *a: None)
    # bookkeeping may change
    train(cfg.replace(log_every=2), data_dir, tmp_path / "r", resume=True, progress=False,
          log=lambda *a: None)


def _read_lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)


def test_a_run_killed_mid_save_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """Two processes (torchrun, FSDP2) each write their shards of the step-4 save and are killed
    before it commits: step 2 (saved by one process) stays the latest, intact; a one-process resume
    removes the half-written folder and finishes."""
    run = tmp_path / "run"
    cfg = tiny_cfg(steps=4, save_every=2)
    train(cfg, data_dir, run, stop_at=2, progress=False, log=lambda *a: None)
    before = load_checkpoint(run)
    assert before["step"] == 2 and before["world_size"] == 1
    sets = [f"--set={k}={v}" for k, v in {
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
        "model.state_size": 4, "seq_len": 24, "global_batch": 4, "micro_batch": 2, "warmup_steps": 2,
        "lr": 3e-3, "eval_tokens": 256, "save_every": 2, "parallel": "fsdp"}.items()]
    env = dict(os.environ, FALCON_MAMBA_TEST_PAUSE_SAVE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "falcon_mamba", "train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run),
           "--steps", "4", "--resume", "--no-progress", *sets]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    pids, seen = [], []
    try:
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            # every rank's message in the line (two ranks' writes to one pipe may share a line)
            pids += [int(p) for p in re.findall(r"save paused \(test hook\) pid (\d+)", line)]
        assert len(pids) == 2, f"the save hook did not fire on both ranks (rc {proc.poll()}): {seen[-20:]}"
        tmp = run / "checkpoints" / "step-00000004.tmp"
        shards = sorted(p.name for p in tmp.iterdir())
        assert shards == ["__0_0.distcp", "__1_0.distcp"], shards  # each rank wrote its own; no metadata
        assert all((tmp / s).stat().st_size > 0 for s in shards)
        for pid in pids:  # both ranks die mid-save (torchrun's workers run in their own sessions)
            os.kill(pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    after = load_checkpoint(run)  # intact, and still the previous one
    assert after["step"] == 2 and (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k])
    res = train(cfg, data_dir, run, resume=True, progress=False, log=lambda *a: None)
    assert res.steps == 4 and load_checkpoint(run)["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]


def test_keeps_the_newest_checkpoints(data_dir, tmp_path):
    run = tmp_path / "r"
    train(tiny_cfg(steps=4, save_every=1, keep_checkpoints=2), data_dir, run, progress=False, export=False,
          log=lambda *a: None)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000003",
                                                                       "step-00000004"]
    assert load_checkpoint(run / "checkpoints" / "step-00000003")["step"] == 3


def test_prune_keeps_what_latest_leads_to(tmp_path):
    """A run killed between the rename and the pointer leaves step-N past `latest`; one killed
    mid-write leaves step-N.tmp: neither survives, nor checkpoints older than the newest `keep`."""
    from falcon_mamba.train.checkpoint import prune

    root = tmp_path / "checkpoints"
    for name in ("step-00000001", "step-00000002", "step-00000003", "step-00000004", "step-00000004.tmp"):
        (root / name).mkdir(parents=True)
    (root / "latest").write_text("step-00000003\n")
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003"]


def test_damaged_checkpoint_is_a_clear_error(data_dir, tmp_path):
    run = tmp_path / "r"
    train(tiny_cfg(steps=1), data_dir, run, progress=False, export=False, log=lambda *a: None)
    (run / "checkpoints" / "step-00000001" / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a readable training checkpoint"):
        load_checkpoint(run)
    (run / "checkpoints" / "latest").write_text("step-00000009\n")
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        train(tiny_cfg(steps=2), data_dir, run, resume=True, progress=False, log=lambda *a: None)
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="single-file format"):
        train(tiny_cfg(steps=2), data_dir, legacy, resume=True, progress=False, log=lambda *a: None)


def test_activation_checkpointing_gives_the_same_step(data_dir, tmp_path):
    cfg = tiny_cfg(steps=2)
    a = train(cfg, data_dir, tmp_path / "a", progress=False, export=False, log=lambda *a: None)
    b = train(cfg.replace(activation_checkpointing=True), data_dir, tmp_path / "b", progress=False,
              export=False, log=lambda *a: None)
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)


def test_time_budget_only_ever_lowers_the_steps():
    from falcon_mamba.train.loop import steps_for_budget

    cfg = get_recipe("tiny").replace(steps=100, global_batch=8)
    assert steps_for_budget(cfg, 10, seconds_per_row=0.01, seconds_left=1e6) == 100
    assert steps_for_budget(cfg, 10, seconds_per_row=0.01, seconds_left=4.0) == 10 + int(0.9 * 400 / 8)
    assert steps_for_budget(cfg, 10, seconds_per_row=1.0, seconds_left=0.0) == 11


def test_time_budget_fixes_the_step_count(data_dir, tmp_path):
    cfg = tiny_cfg(steps=10_000, time_budget_s=3.0, log_every=50)
    res = train(cfg, data_dir, tmp_path / "r", progress=False, export=False, log=lambda *a: None)
    assert 24 <= res.steps < 10_000
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["steps"] == res.steps and saved["time_budget_s"] == 0.0


def test_cli_train_and_plot_run(data_dir, tmp_path, capsys):
    from falcon_mamba.cli import main

    out = tmp_path / "cli"
    args = ["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--steps", "3",
            "--no-progress", "--set", "model.hidden_size=32", "--set", "seq_len=24"]
    assert main(args) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert main(["plot-run", str(out)]) == 0
    png = (out / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(args[:-2] + ["--set", "model.hidden=3"]) == 2
    assert "unknown model field" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a prepared data folder" in capsys.readouterr().err


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    quiet = {"progress": False, "export": False, "log": lambda *a: None}
    big = train(tiny_cfg(steps=3, micro_batch=4), data_dir, tmp_path / "big", **quiet)
    small = train(tiny_cfg(steps=3, micro_batch=1), data_dir, tmp_path / "small", **quiet)
    assert big.train_loss == pytest.approx(small.train_loss, rel=1e-5)
    wa, wb = load_checkpoint(tmp_path / "big")["model"], load_checkpoint(tmp_path / "small")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


def test_bf16_autocast_keeps_fp32_master_weights(data_dir, tmp_path):
    res = train(tiny_cfg(steps=2, precision="bf16"), data_dir, tmp_path / "r", progress=False, export=False,
                log=lambda *a: None)
    assert math.isfinite(res.train_loss)
    payload = load_checkpoint(tmp_path / "r")
    assert all(v.dtype == torch.float32 for v in payload["model"].values())
    moments = {k: v for k, v in read_tensors(tmp_path / "r", "optim.state.").items()
               if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert len(moments) == 2 * len(payload["model"])
    assert all(v.dtype == torch.float32 for v in moments.values())
