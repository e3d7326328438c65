"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (files named bench_*.py).

Small shapes (the suite is quick); `throughput.py` is the side-by-side run at real shapes. Each bench
also checks its result against a plain-PyTorch computation outside the timed region, so a fast wrong
kernel fails instead of winning. fasttrdpo entry points that are not importable are skipped with the
reason. The Triton backend runs only on CUDA tensors here (no interpreter: it would time numpy).
"""
from __future__ import annotations

import os
import sys

import pytest

os.environ.pop("TRITON_INTERPRET", None)  # time compiled code, never the interpreter
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collect_file(parent, file_path):
    # A file named on the command line is collected by pytest itself: adding it again would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.fixture(scope="session")
def device():
    import torch

    return torch.device("cuda" if _cuda() else "cpu")


def backends_for_device():
    """The fasttrdpo backends worth timing on this machine (cpp only when its extension builds)."""
    return ["eager", "cpp", "triton"] if _cuda() else ["eager", "cpp"]


def need(*names):
    """The fasttrdpo attributes a bench uses; skips the bench (with the reason) when one is missing."""
    from _cases import Skip, _fasttrdpo

    try:
        return _fasttrdpo(*names)
    except Skip as e:
        pytest.skip(str(e))


def prepare_backend(backend, device):
    from _cases import Skip, _build_cpp

    if backend == "triton" and device.type != "cuda":
        pytest.skip("triton backend needs CUDA tensors")
    if backend == "cpp":
        if device.type != "cpu":
            pytest.skip("cpp backend runs on CPU tensors only")
        try:
            _build_cpp()
        except Skip as e:
            pytest.skip(str(e))
