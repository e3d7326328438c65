"""benchmarks/memory_model.py (the README's bytes-per-GPU table) against hand-computed values."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import memory_model as M  # noqa: E402


def test_parameter_counts_are_the_published_ones():
    shapes = {s.name: s for s in M.SHAPES}
    # Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B (the counts their model cards / safetensors give)
    assert shapes["1B"].params() == 1_235_814_400
    assert shapes["8B"].params() == 8_030_261_248
    assert shapes["70B"].params() == 70_553_706_496
    # 8B by hand: embeddings + lm_head 2 * 128256 * 4096, final norm 4096, 32 layers of
    # q, o 4096^2 each, k, v 4096 * 1024 each, MLP 3 * 4096 * 14336, two norms 2 * 4096
    layer = 2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert layer == 218_112_000 == shapes["8B"].layer_params()
    assert 32 * layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248


def test_bytes_per_gpu_by_hand():
    s8 = next(s for s in M.SHAPES if s.name == "8B")
    # DDP: (4 + 4 + 8) B policy + AdamW and 2 B bf16 reference per parameter, on every GPU
    assert M.state_bytes(s8, "ddp", 8) == 18 * 8_030_261_248 == 144_544_702_464
    # FSDP2 and ZeRO-3: the same divided by 8 GPUs
    assert M.state_bytes(s8, "fsdp2", 8) == M.state_bytes(s8, "zero3", 8) == 18_068_087_808
    # gathered while stepping: bf16 roots of policy and reference (2 * 2 * 128256 * 4096 + norm) + two layers
    assert M.fsdp_transient_bytes(s8) == 2 * (2 * (2 * 128256 * 4096 + 4096) + 2 * 218_112_000)
    row = {r["model"]: r for r in M.table(8)}["70B"]
    assert row["ddp_gib"] == pytest.approx(18 * 70_553_706_496 / 2 ** 30)
    assert row["fsdp2_gib"] == pytest.approx(18 * 70_553_706_496 / 8 / 2 ** 30)
    with pytest.raises(ValueError, match="mode"):
        M.state_bytes(s8, "ddp2", 8)
