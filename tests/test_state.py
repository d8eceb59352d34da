"""The State object: size, clone, row selection, cat, and its file format (round trip, wrong model,
damaged files, atomic writes)."""

import os

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba.config import PRESETS
from falcon_mamba.errors import UserError
from falcon_mamba.state import State
from tests.helpers import tiny_falcon_lm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids waiting on descheduled workers
    yield
    torch.set_num_threads(n)


CFG = PRESETS["tiny-odd"]  # 3 layers, K=3, D=100, N=5


def random_state(rng, batch=3, dtype=torch.float32):
    s = State.zeros(CFG, batch, dtype)
    s.conv.copy_(torch.randn(s.conv.shape, generator=rng))
    s.ssm.copy_(torch.randn(s.ssm.shape, generator=rng))
    s.tokens_seen = 17
    return s


def test_shapes_dtypes_and_nbytes():
    s = State.zeros(CFG, 2, torch.bfloat16)
    nL, K, D, N = 3, 3, 100, 5
    assert s.conv.shape == (nL, 2, K - 1, D) and s.conv.dtype == torch.bfloat16
    assert s.ssm.shape == (nL, 2, D, N) and s.ssm.dtype == torch.float32
    assert s.nbytes == nL * 2 * ((K - 1) * D * 2 + D * N * 4)
    # The 7B state: 64 layers x (3 x 8192 bf16 + 8192 x 16 fp32) per row, whatever the context.
    big = PRESETS["falcon-mamba-7b"]
    per_row = big.num_hidden_layers * (3 * 8192 * 2 + 8192 * 16 * 4)
    assert per_row == 36_700_160
    with torch.device("meta"):
        assert State.zeros(big, 1, torch.bfloat16, "meta").nbytes == per_row


def test_clone_is_independent(rng):
    s = random_state(rng)
    c = s.clone()
    c.ssm.add_(1.0)
    c.conv.mul_(2.0)
    assert not torch.equal(c.ssm, s.ssm) and not torch.equal(c.conv, s.conv)
    assert c.tokens_seen == s.tokens_seen


def test_select_reorders_repeats_and_cat_restores(rng):
    s = random_state(rng)
    r = s.select([2, 0, 0])
    assert r.batch_size == 3
    assert torch.equal(r.ssm[:, 0], s.ssm[:, 2]) and torch.equal(r.ssm[:, 2], s.ssm[:, 0])
    assert torch.equal(r.conv[:, 1], s.conv[:, 0])
    r.ssm[:, 1].zero_()  # a copy, not a view
    assert s.ssm[:, 0].abs().sum() > 0
    back = State.cat([s.select([0]), s.select([1]), s.select([2])])
    assert torch.equal(back.ssm, s.ssm) and torch.equal(back.conv, s.conv)
    with pytest.raises(UserError, match="out of range"):
        s.select([3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(rng, tmp_path, dtype):
    s = random_state(rng, dtype=dtype)
    path = tmp_path / "sub" / "a.state"
    s.save(path)
    t = fm.load_state(path, CFG)
    assert torch.equal(t.ssm, s.ssm) and torch.equal(t.conv, s.conv)
    assert t.conv.dtype == dtype and t.ssm.dtype == torch.float32 and t.tokens_seen == 17
    assert [p.name for p in path.parent.iterdir()] == ["a.state"]  # no temp file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not 0600


def test_load_state_follows_the_model_dtype(rng, tmp_path):
    model = tiny_falcon_lm(vocab_size=300).to_dtype(torch.bfloat16)
    s32 = State.zeros(model.config, 1, torch.float32)
    s32.conv.copy_(torch.randn(s32.conv.shape, generator=rng))
    s32.save(tmp_path / "s")
    t = fm.load_state(tmp_path / "s", model)
    assert t.conv.dtype == torch.bfloat16 and t.device == model.device
    assert torch.equal(t.conv, s32.conv.bfloat16())


def test_state_of_another_model_is_refused(rng, tmp_path):
    random_state(rng).save(tmp_path / "odd.state")
    with pytest.raises(UserError) as e:
        fm.load_state(tmp_path / "odd.state", PRESETS["tiny"])
    assert "another model" in str(e.value) and "\n" not in str(e.value)


def _damaged(tmp_path, rng, how):
    good = tmp_path / "good.state"
    random_state(rng).save(good)
    data = bytearray(good.read_bytes())
    bad = tmp_path / "bad.state"
    if how == "truncated":
        bad.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped byte":
        data[-40] ^= 0xFF  # inside the tensor data: only the checksum can see it
        bad.write_bytes(bytes(data))
    elif how == "garbage":
        bad.write_bytes(torch.randint(0, 256, (5000,), generator=rng, dtype=torch.uint8).numpy().tobytes())
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "not a state":
        from safetensors.torch import save_file

        save_file({"x": torch.ones(3)}, str(bad))
    return bad


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "garbage", "empty", "not a state"])
def test_damaged_state_files_are_clear_errors(rng, tmp_path, how):
    bad = _damaged(tmp_path, rng, how)
    with pytest.raises(UserError) as e:
        fm.load_state(bad, CFG)
    msg = str(e.value)
    assert str(bad) in msg and ("damaged" in msg or "not a falcon-mamba state" in msg), msg
    assert "\n" not in msg


def test_missing_state_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        fm.load_state(tmp_path / "nope.state", CFG)


def test_failed_save_keeps_the_old_file(rng, tmp_path, monkeypatch):
    path = tmp_path / "keep.state"
    old = random_state(rng)
    old.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(UserError, match="disk full"):  # one line for the user, not a traceback
        random_state(rng).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.state"]
