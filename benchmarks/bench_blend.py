"""The reference update over a Pythia-160M-shaped parameter list (scaled to 1/8 width here), in place."""
from __future__ import annotations

import math

import pytest
import torch

from _cases import Blend, Skip, param_list
from conftest import backends_for_device, prepare_backend

SHAPES = [list(s) for s in param_list("pythia-160m", 0.125)]  # 148 tensors, ~2.8M elements


def _shape(pdt):
    return dict(params="pythia-160m", scale=0.125, tensors=len(SHAPES), elements=sum(math.prod(s) for s in SHAPES),
                policy_dtype=pdt, ref_dtype="bf16", shapes=SHAPES)


def _bench(benchmark, impl, pdt, device):
    try:
        case = Blend(impl, _shape(pdt), device)
    except Skip as e:
        pytest.skip(str(e))
    benchmark.pedantic(case.step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = case.bytes_moved / benchmark.stats.stats.median / 1e9
    # every bf16 result within the two-rounding bound of the float64 formula (see throughput.py)
    assert case.numerics(None)["max_err_ulps_of_operand_max"] <= 1.0 + 1e-3


@pytest.mark.benchmark(group="blend pythia-160m/8 fp32->bf16")
@pytest.mark.parametrize("impl", ["trl-loop", "foreach-lerp"])
def test_blend_fp32_peer(benchmark, device, impl):
    _bench(benchmark, impl, "fp32", device)


@pytest.mark.benchmark(group="blend pythia-160m/8 fp32->bf16")
@pytest.mark.parametrize("backend", backends_for_device())
def test_blend_fp32_fasttrdpo(benchmark, device, backend):
    prepare_backend(backend, device)
    _bench(benchmark, f"fasttrdpo-{backend}", "fp32", device)


@pytest.mark.benchmark(group="blend pythia-160m/8 bf16->bf16")
@pytest.mark.parametrize("impl", ["trl-loop", "foreach-lerp"])
def test_blend_bf16_peer(benchmark, device, impl):
    _bench(benchmark, impl, "bf16", device)


@pytest.mark.benchmark(group="blend pythia-160m/8 bf16->bf16")
@pytest.mark.parametrize("backend", backends_for_device())
def test_blend_bf16_fasttrdpo(benchmark, device, backend):
    prepare_backend(backend, device)
    _bench(benchmark, f"fasttrdpo-{backend}", "bf16", device)
