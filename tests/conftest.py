import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # The kernels' CPU tests run in Triton's interpreter, which must be on before anything imports
    # triton: triton.language's own jit functions (tl.zeros ...) become interpreted functions only
    # then. Each Triton test module also sets it, but a run whose first collected module imports
    # triton without it (tests/test_kernel_launches.py with tests/test_triton_conv.py, -n 2) failed
    # every interpreted kernel with "Cannot call @triton.jit'd outside of the scope of a kernel".
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared beside the checkout (as in CI); FALCON_MAMBA_SHARED overrides it.
SHARED = os.environ.get("FALCON_MAMBA_SHARED") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared")
FALCON_TOKENIZER = os.path.join(SHARED, "tokenizers", "falcon", "tokenizer.json")


def pytest_addoption(parser):
    parser.addoption("--llama-cpp", action="store_true",
                     help="run the llama.cpp tests (tests/test_gguf_llama.py; needs llama-cpp-python, "
                          "pip install -e '.[gguf-test]')")


def pytest_collection_modifyitems(config, items):
    # The llama.cpp tests are opt-in: without --llama-cpp they are deselected (not skipped: nothing
    # is missing, they were not asked for); with it, a missing llama-cpp-python fails them.
    if not config.getoption("--llama-cpp"):
        keep = [i for i in items if "llama_cpp" not in i.keywords]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if "llama_cpp" in i.keywords])
            items[:] = keep
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run the cuda suite on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh seeded generator per test: random data, never zeros, reproducible on failure."""
    return torch.Generator().manual_seed(1234)
