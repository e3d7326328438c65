"""RefModelUpdater under 2-process DDP and FSDP2 (fully_shard) on CPU with gloo.

Each rank trains on its own batches; DDP averages gradients (every rank then blends its full copy of
the reference), FSDP2 reduce-scatters them (every rank blends only its local shards). The one-process
run computes the same averaged gradient by hand ((g0 + g1) / 2, exact to the bit: the division by 2
is exact and fp addition of two terms is commutative), so the references must agree bit for bit
with it, and across ranks. Workers: tests/ref_update_worker.py (one thread per process).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref_update_worker.py")
STEPS = 5  # tau = 2: updates at steps 2 and 4, step 5 trains past the last update
EXPECTED_FIRED = [False, True, False, True, False]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "FASTTRDPO_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "single.pt"
    _run("single", path, STEPS)
    return torch.load(path, weights_only=True)


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.slow
def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path, single):
    _run("ddp", tmp_path / "ddp", STEPS, _free_port())
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt", weights_only=True) for r in range(2)]
    assert single["fired"] == EXPECTED_FIRED
    for r, res in enumerate(ranks):
        assert res["fired"] == EXPECTED_FIRED
        _assert_same(res["ref"], single["ref"], f"DDP rank {r} vs one process")
    _assert_same(ranks[0]["ref"], ranks[1]["ref"], "DDP rank 0 vs rank 1")
    # The updates really moved the reference away from its initial weights.
    sys.path.insert(0, os.path.dirname(WORKER))
    from ref_update_worker import make_model

    init = make_model(0).state_dict()
    assert all(not torch.equal(init[k], single["ref"][k]) for k in init)


@pytest.mark.slow
def test_fsdp2_two_ranks_blend_local_shards_without_all_gather(tmp_path, single):
    """fully_shard runs on CPU/gloo in this torch, so FSDP2 is tested for real (not only DTensor shards)."""
    _run("fsdp2", tmp_path / "fsdp", STEPS, _free_port())
    ranks = [torch.load(tmp_path / f"fsdp.rank{r}.pt", weights_only=True) for r in range(2)]
    for r, res in enumerate(ranks):
        assert res["fired"] == EXPECTED_FIRED
        assert res["gathers_in_updates"] == 0  # the update itself never all-gathers
        _assert_same(res["ref"], single["ref"], f"FSDP2 rank {r} (gathered for the test) vs one process")
        # Each rank's local shard is its dim-0 slice of the one-process reference.
        for name, shard in res["ref_local"].items():
            full = single["ref"][name]
            rows = -(-full.shape[0] // 2)  # FSDP2 shards dim 0 in ceil(n / world) rows per rank
            assert torch.equal(shard, full[r * rows:(r + 1) * rows]), name
        # NaN in rank 1's policy shard: both ranks raise and keep their shards.
        assert res["nan_raised"] and res["nan_left_ref_unchanged"]
