"""kill -9 in the middle of training, then `--resume latest`: the final policy and reference are
bit-identical to an uninterrupted run (CPU, one thread, deterministic), and so is the logged loss curve."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fasttrdpo.cli import TINY_MODEL
from fasttrdpo.tiny import tiny_model
from fasttrdpo.trainer import TRDPOConfig, find_latest_checkpoint

MAX_STEPS = 60
ARGS = ["--model", "tiny", "--data", "synthetic", "--train-size", "512", "--eval-size", "8",
        "--max-steps", str(MAX_STEPS), "--save-steps", "5", "--tau", "4", "--alpha", "0.5",
        "--per-device-train-batch-size", "8", "--logging-steps", "1", "--eval-steps", "0",
        "--lr-scheduler-type", "linear", "--no-plot", "--disable-tqdm", "--threads", "1"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "fasttrdpo", "train", *ARGS, "--output-dir", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _weights(ckpt):
    return {"policy": load_file(os.path.join(ckpt, "model.safetensors")),
            "reference": load_file(os.path.join(ckpt, "reference", "model.safetensors"))}


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_kill_9_then_resume_latest_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(straight), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not os.path.isdir(killed / "checkpoint-10"):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-10 in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    latest = find_latest_checkpoint(str(killed))
    assert latest is not None and int(latest.rsplit("-", 1)[1]) < MAX_STEPS  # killed mid-training
    _weights(latest)  # the last complete checkpoint loads

    subprocess.run(_cmd(killed, "--resume"), check=True, env=_env(), capture_output=True, timeout=300)
    a = _weights(straight / f"checkpoint-{MAX_STEPS}")
    b = _weights(killed / f"checkpoint-{MAX_STEPS}")
    for part in ("policy", "reference"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    # the reference really moved (15 soft updates): it is neither the initial model nor the policy
    initial = tiny_model(TRDPOConfig.seed, **TINY_MODEL).state_dict()["gpt_neox.embed_in.weight"]
    ref_embed = a["reference"]["gpt_neox.embed_in.weight"]
    assert not torch.equal(ref_embed, initial) and not torch.equal(ref_embed, a["policy"]["gpt_neox.embed_in.weight"])
    assert _losses(killed) == _losses(straight)
    assert [s for s, _ in _losses(killed)] == list(range(1, MAX_STEPS + 1))
    state = json.load(open(killed / f"checkpoint-{MAX_STEPS}" / "trainer_state.json"))
    assert state["ref_updates"] == MAX_STEPS // 4 and state["global_step"] == MAX_STEPS
