"""The DPO loss step at the lm_head level (policy fwd+bwd, reference fwd) at a small shape, against peers."""
from __future__ import annotations

import pytest
import torch

from _cases import LossStep, Skip
from conftest import backends_for_device, prepare_backend

SHAPE = dict(pairs=2, seq=128, hidden=64, vocab=4000)  # N = 512 tokens
GROUP = "loss step fwd+bwd N=512 H=64 V=4000"


def _bench(benchmark, impl, device):
    try:
        case = LossStep(impl, SHAPE, device)
    except Skip as e:
        pytest.skip(str(e))
    try:
        out = benchmark.pedantic(case.step, setup=case.before_each, rounds=5, warmup_rounds=1)
    except ImportError as e:  # an entry point that imports its backend lazily and cannot
        pytest.skip(f"not importable when called: {e}")
    except NotImplementedError as e:  # the library does not provide this backend here
        pytest.skip(f"not provided: {e}")
    return case, out


def _naive_loss(device):
    case = LossStep("naive", SHAPE, device)
    return case.numerics(case.step())


def _check(case, out, device):
    got = case.numerics(out)
    ref = _naive_loss(device)
    # fp32 everywhere: the same loss and policy gradient as the plain computation up to summation order
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
    assert got["grad_weight"]["norm"] == pytest.approx(ref["grad_weight"]["norm"], rel=1e-3)
    assert got["grad_hidden"]["norm"] == pytest.approx(ref["grad_hidden"]["norm"], rel=1e-3)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("impl", ["naive", "trl", "trl-chunked", "liger"])
def test_loss_step_peer(benchmark, device, impl):
    case, out = _bench(benchmark, impl, device)
    _check(case, out, device)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("backend", backends_for_device())
def test_loss_step_fasttrdpo(benchmark, device, backend):
    prepare_backend(backend, device)
    case, out = _bench(benchmark, f"fasttrdpo-{backend}", device)
    _check(case, out, device)
