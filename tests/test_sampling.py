"""SamplingParams: validation at the edge (the draw itself: tests/test_sample_rows.py)."""


import pytest
import torch

from falcon_mamba.errors import UserError
from falcon_mamba.sampling import SamplingParams


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids waiting on descheduled workers
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.2}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": -3}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_params_are_one_line_user_errors(kwargs, words):
    with pytest.raises(UserError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_params_normalise_stop_and_ids():
    p = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
