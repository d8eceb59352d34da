"""Shared test helpers."""

import torch


def assert_close(actual, expected, rtol, atol, what=""):
    """allclose with max/mean differences in the failure message."""
    actual = actual.float()
    expected = expected.float()
    diff = (actual - expected).abs()
    ok = torch.allclose(actual, expected, rtol=rtol, atol=atol)
    assert ok, (f"{what} mismatch: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
                f"max |expected| {expected.abs().max().item():.3e}")
