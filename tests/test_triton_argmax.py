"""The greedy-token kernel (ops/triton_argmax.py) against torch.argmax (interpreter on CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops.triton_argmax import greedy_tokens  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("V", [7, 4096, 9000])
def test_greedy_tokens_match_torch_argmax(V, rng):
    """Random rows, a row of ties (the first index wins, also across chunks), a row whose maximum
    sits in the last partial chunk, -inf rows, and NaN (torch answers the first NaN)."""
    x = torch.randn(7, V, generator=rng)
    x[1] = 1.0  # all tied
    x[2, -1] = 50.0  # the last element
    x[3] = float("-inf")
    x[4, V // 2] = float("nan")
    x[4, V - 1] = float("nan")
    x[5, :] = -1.0
    x[5, [V - 1, V // 3]] = 3.0  # tie between two chunks (when V > BLOCK): the earlier index
    x[6, 0] = float("inf")
    x = x.to(DEV)
    ref = x.argmax(-1)
    out = torch.full((7,), -1, dtype=torch.int64, device=DEV)
    assert greedy_tokens(x, out) is out
    assert torch.equal(out, ref), (out, ref)


def test_greedy_tokens_of_a_row_view(rng):
    """Rows with a stride (a view into a wider buffer) and a fresh output."""
    buf = torch.randn(3, 130, generator=rng).to(DEV)
    x = buf[:, :100]
    assert torch.equal(greedy_tokens(x), x.argmax(-1))


def test_greedy_tokens_record_a_history_ring(rng):
    """history=(ring, pos): each call also stores each row's token at ring[b, pos[b] % C] and
    advances pos[b] (the graphed greedy loop's record); rows beyond B are left alone."""
    ring = torch.full((3, 4), -1, dtype=torch.int64, device=DEV)
    pos = torch.zeros(3, dtype=torch.int32, device=DEV)
    want = []
    for _ in range(6):
        x = torch.randn(2, 50, generator=rng).to(DEV)
        greedy_tokens(x, history=(ring, pos))
        want.append(x.argmax(-1))
    assert pos.tolist() == [6, 6, 0]
    for i, t in enumerate(want[2:], start=2):  # steps 4 and 5 overwrote slots 0 and 1
        assert torch.equal(ring[:2, i % 4], t)
    assert ring[2].tolist() == [-1] * 4
