"""benchmarks/bench_train.py on the tiny shape (CPU): both models and `falcon-mamba train` run, the
table and the JSON record carry every figure, and the CLI's log is parsed."""

import json

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_train_tiny_smoke(tmp_path, capsys):
    from benchmarks.bench_train import main

    assert main(["--shape", "tiny", "--models", "mamba,mamba-plain,transformer", "--warmup", "1",
                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rec = json.loads(out.strip().splitlines()[-1])
    files = list(tmp_path.glob("train-*-tiny-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["rows"] == rec["rows"]
    assert [r["model"] for r in rec["rows"]] == ["mamba", "mamba-plain", "transformer"]
    rate = rec["matmul_flop_per_s"]
    assert rate > 0
    for r in rec["rows"]:
        assert len(r["step_times_s"]) == 2 and r["tok_s"] == pytest.approx(128 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["tok_s"] * r["flops_per_token"] / rate)
        assert all(5.0 < x < 7.5 for x in r["losses"])  # ~ln(512) = 6.24 at init, random tokens
    mamba, plain, tf = rec["rows"]
    assert mamba["parameters"] == plain["parameters"]
    assert abs(tf["parameters"] - mamba["parameters"]) / mamba["parameters"] < 0.02
    # the same model, data and seed: the fused loss sees the same losses as the plain one
    assert mamba["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    cli = rec["cli"]
    assert cli["returncode"] == 0, cli.get("error")
    assert cli["tok_s"] > 0 and len(cli["tok_s_per_step"]) == 2
    assert cli["peak"].startswith("peak_tflops=") and cli["peak"].endswith("(given)")
    assert cli["mfu"] == pytest.approx(cli["mfu_at_bench_rate"], rel=1e-3)  # it was given our rate
    assert "| `falcon-mamba train` on the Mamba shape (its own log) |" in out
    assert "Mamba / Transformer tok/s:" in out and "`falcon-mamba train` / benchmark:" in out


def test_bench_train_7b_path_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    """The 7b shape's path (activation checkpointing, accumulation, no CLI row) on tiny sizes."""
    import benchmarks.bench_train as bt

    monkeypatch.setitem(bt.SHAPES, "7b", dict(bt.SHAPES["tiny"], checkpointing=True, accum=2))
    assert bt.main(["--shape", "7b", "--models", "mamba,transformer", "--warmup", "0", "--steps", "1",
                    "--device", "cpu", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    rec = json.loads(captured.out.strip().splitlines()[-1])
    assert rec["cli"] is None and rec["checkpointing"] and rec["tokens_per_step"] == 2 * 64 * 2
    assert "would not fit" in captured.err and "activation checkpointing" in captured.out
    for r in rec["rows"]:
        assert r["tok_s"] == pytest.approx(256 / r["step_s"]) and 5.0 < r["losses"][0] < 7.5
