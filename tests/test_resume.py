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


# --- in process: what a resume must keep or may change ---------------------------------------------

from fasttrdpo.data import synthetic_preference_dataset  # noqa: E402
from fasttrdpo.tiny import tiny_tokenizer  # noqa: E402
from fasttrdpo.trainer import TRDPOTrainer  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


def _trainer(out, data, evals=None, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_steps=0, save_total_limit=None, plot=False, disable_tqdm=True, tau=100)
    base.update(kw)
    return TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data, TRDPOConfig(**base), eval_dataset=evals)


def test_first_record_after_a_resume_averages_the_same_steps_as_the_uninterrupted_run(tmp_path):
    # save every 4 steps, log every 3: checkpoint-4 holds step 4 of the window that closes at step 6
    data = synthetic_preference_dataset(32, seed=0)
    straight = _trainer(tmp_path / "a", data, save_steps=4, logging_steps=3)
    straight.train()
    resumed = _trainer(tmp_path / "b", data, save_steps=4, logging_steps=3,
                       resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    resumed.train()
    want = [r for r in straight.history if r["step"] == 6][0]
    got = [r for r in resumed.history if r["step"] == 6][0]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm", "learning_rate"):
        assert got[key] == want[key], key  # the same three steps averaged in the same order: bit-identical


def test_resume_with_more_steps_continues_the_learning_rate_and_may_change_tau_and_alpha(tmp_path, caplog):
    data = synthetic_preference_dataset(64, seed=0)
    _trainer(tmp_path, data, max_steps=4, tau=2, alpha=0.5).train()
    caplog.set_level("INFO", logger="fasttrdpo")
    more = _trainer(tmp_path, data, max_steps=8, tau=3, alpha=1.0, resume_from_checkpoint="latest")
    more.train()
    lrs = [r["learning_rate"] for r in more.history]
    # linear over 4 steps from 1e-3: the rate of step s is 1e-3*(1-(s-1)/4) -> step 4 ran at 2.5e-4. Over the
    # new remainder R = 4 the rate decays linearly from there: 2.5e-4 * (R-k)/(R+1), k = 0..3 (one float64
    # product each: 1e-15 relative)
    assert lrs[:4] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-12)
    assert lrs[4:] == pytest.approx([2e-4, 1.5e-4, 1e-4, 5e-5], rel=1e-12)
    assert "continues from 0.00025" in caplog.text and "tau 2 -> 3" in caplog.text and "alpha 0.5 -> 1.0" in caplog.text
    # updates at 2 and 4 with tau 2, then at 6 with tau 3; alpha 1 at step 6 makes the reference the policy
    assert more.ref_updates == 3 and more.updater.tau == 3
    assert [r["ref_updates"] for r in more.history] == [0, 1, 1, 2, 2, 3, 3, 3]


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, caplog):
    data, evals = synthetic_preference_dataset(32, seed=0), synthetic_preference_dataset(4, seed=5)
    first = _trainer(tmp_path, data, evals, max_steps=3)
    final = first.train()
    mtime = os.path.getmtime(tmp_path / "checkpoint-3" / "trainer_state.pt")
    again = _trainer(tmp_path, data, evals, max_steps=3, resume_from_checkpoint="latest")
    assert again.train() == final  # the recorded final evaluation, not a second one
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_loss" in r] == [3]
    assert os.path.getmtime(tmp_path / "checkpoint-3" / "trainer_state.pt") == mtime  # not re-saved
    assert "nothing to train" in caplog.text
