"""Test configuration.

Without a GPU the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be set
before any `@triton.jit` decorator executes, i.e. before fasttrdpo (and its kernels) are imported.
On a CUDA machine the kernels are compiled for real and the `gpu` tests run.
"""
import os
import sys

import pytest

def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False

if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    # `-m gpu` alone (scripts/gpu_check.sh): collection looks the C++ build up instead of loading it
    import helpers

    helpers.GPU_ONLY_SESSION = (config.getoption("markexpr", "") or "").strip() == "gpu"


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
