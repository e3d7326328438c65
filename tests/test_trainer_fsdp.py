"""FSDP2 in TRDPOTrainer (`--fsdp`), 2 CPU processes with gloo.

One real `torchrun --nproc_per_node 2 -m fasttrdpo train --fsdp` run is checked against a 1-process run
with the same global batch (loss per step, final policy and reference gathered through `fasttrdpo
export`), and for the bytes each rank holds. The other 2-rank runs fork the test process (no second
import of torch/transformers: a torchrun launch costs ~25 s here): kill -9 in the middle of a sharded
save then resume (bit-exact), the collectives made by the reference update (none but the NaN flag's
all-reduce), and bf16 mixed precision.
"""
import collections
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = 10
COMMON = ["--model", "tiny", "--data", "synthetic", "--train-size", "256", "--eval-size", "16",
          "--tau", "3", "--alpha", "0.5", "--logging-steps", "1", "--eval-steps", "0",
          "--no-plot", "--disable-tqdm", "--threads", "1"]
# global batch 4 = 1 pair x 2 micro-batches (FSDP's no_sync until the last) x 2 ranks
FSDP = ["train", *COMMON, "--fsdp", "--max-steps", str(STEPS), "--save-steps", "5",
        "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "2"]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(out):
    return [(r["step"], r["loss"]) for r in _records(out) if "loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, argv, kill_at, probe_dir):
    """One forked rank: `fasttrdpo <argv>` with torchrun's environment; optional probes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    from fasttrdpo import cli
    from fasttrdpo.ref_update import RefModelUpdater
    from fasttrdpo.training import sharded_checkpoint

    calls, control, updates, inside = collections.Counter(), collections.Counter(), [0], [False]
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                 "reduce_scatter_tensor", "all_to_all", "send", "recv"):
        def counting(*a, _fn=getattr(dist, name), _name=name, **k):
            if inside[0]:
                calls[_name] += 1
            return _fn(*a, **k)
        setattr(dist, name, counting)
    original_update = RefModelUpdater.update

    def counted_update(self):
        inside[0] = True
        try:
            with CommDebugMode() as comm:  # DTensor's functional collectives (full_tensor() would show here)
                original_update(self)
            calls.update({f"traced {op}": n for op, n in comm.get_comm_counts().items()})
        finally:
            inside[0] = False
        updates[0] += 1
        if updates[0] == 1:  # control: the same probe does see a gather (of one policy parameter)
            with CommDebugMode() as comm:
                self._tensors()[1][0].full_tensor()
            control.update({str(op): n for op, n in comm.get_comm_counts().items()})
    RefModelUpdater.update = counted_update
    if kill_at is not None:
        original_save = sharded_checkpoint.save_tensors

        def save_then_die(trainer, folder):  # every rank dies with its shards on disk, before the rename
            original_save(trainer, folder)
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        sharded_checkpoint.save_tensors = save_then_die
    code = cli.main(argv)
    if probe_dir:
        with open(os.path.join(probe_dir, f"probe_{rank}.json"), "w") as f:
            json.dump({"updates": updates[0], "calls": dict(calls), "control": dict(control)}, f)
    os._exit(code)


def _fork_ranks(argv, world=2, kill_at=None, probe_dir=None) -> list[int]:
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, argv, kill_at, probe_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fasttrdpo import cli

    root = tmp_path_factory.mktemp("fsdp")
    out = {k: root / k for k in ("one", "fsdp", "killed", "bf16", "export_fsdp", "export_resumed")}
    # the 1-process run: the same global batch (4 pairs), no FSDP
    assert cli.main(["train", *COMMON, "--max-steps", str(STEPS), "--save-steps", "0",
                     "--per-device-train-batch-size", "4", "--output-dir", str(out["one"])]) == 0
    # the product command line, as a user runs it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "fasttrdpo", *FSDP, "--output-dir", str(out["fsdp"])]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    # kill -9 of both ranks during the save of checkpoint-10, then --resume latest (checkpoint-5)
    probe = root / "probe"
    probe.mkdir()
    codes = _fork_ranks([*FSDP, "--output-dir", str(out["killed"])], kill_at=STEPS)
    assert codes == [-signal.SIGKILL] * 2, codes
    out["debris"] = sorted(os.listdir(out["killed"]))
    codes = _fork_ranks([*FSDP, "--output-dir", str(out["killed"]), "--resume"], probe_dir=str(probe))
    assert codes == [0, 0], codes
    out["probes"] = [json.load(open(probe / f"probe_{r}.json")) for r in range(2)]
    # bf16 mixed precision (bf16 compute, fp32 master weights and reduction), bf16 reference
    codes = _fork_ranks(["train", *COMMON, "--fsdp", "--bf16", "--ref-dtype", "bfloat16", "--max-steps", "3",
                         "--tau", "2", "--save-steps", "0", "--eval-size", "0", "--per-device-train-batch-size", "2",
                         "--output-dir", str(out["bf16"])])
    assert codes == [0, 0], codes
    for src, dst in (("fsdp", "export_fsdp"), ("killed", "export_resumed")):
        assert cli.main(["export", str(out[src] / f"checkpoint-{STEPS}"), str(out[dst])]) == 0
    return out


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_fsdp_loss_and_weights_match_one_process_with_the_same_global_batch(runs):
    one, two = _losses(runs["one"]), _losses(runs["fsdp"])
    assert [s for s, _ in two] == list(range(1, STEPS + 1))
    # Same pairs per step; only the reduction order differs (each micro-batch pads its pair to its own
    # length, gradients are summed over 2 micro-batches and averaged by reduce-scatter instead of one mean
    # over 4 pairs): fp32 round-off of ~1e-7
    # relative per step, grown by 10 Adam steps at lr <= 1e-3. The bound: 1e-4 relative per step.
    for (s, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (s, a, b)
    final = json.load(open(runs["fsdp"] / "final_metrics.json"))
    assert [r["ref_updates"] for r in _records(runs["fsdp"]) if "loss" in r] == [s // 3 for s in range(1, STEPS + 1)]
    # final policy and reference, gathered (exported from the shards) vs the 1-process run's:
    # max|dw| / max|w| <= 1e-5 (the bound; measured 4.4e-6 on the policy, 2.2e-6 on the reference)
    for sub in ("", "reference"):
        a = _weights(runs["one"] / f"checkpoint-{STEPS}" / sub)
        b = _weights(runs["export_fsdp"] / sub)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype for k in a)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        scale = max(float(a[k].abs().max()) for k in a)
        assert worst / scale <= 1e-5, (sub, worst, scale)
    # final/ (what people load) is the last step's gathered policy, bit for bit what `fasttrdpo export` writes
    final_policy = _weights(runs["fsdp"] / "final")
    exported = _weights(runs["export_fsdp"])
    assert final_policy.keys() == exported.keys() and all(torch.equal(final_policy[k], exported[k]) for k in exported)
    assert not (runs["fsdp"] / "final" / "reference").exists()  # save_reference is off
    # the DDP rank-agreement check, over the gathered state: both ranks hashed the same full weights
    fps = final["rank_fingerprints"]
    assert final["world_size"] == 2 and len(fps) == 2 and fps[0] == fps[1]
    # evaluation ran sharded (KL included) and agrees with the 1-process evaluation
    final1 = json.load(open(runs["one"] / "final_metrics.json"))
    assert final["eval_pairs"] == final1["eval_pairs"] == 16
    for key in ("eval_loss", "eval_kl/ref", "eval_kl/init", "eval_rewards/margins"):
        assert abs(final[key] - final1[key]) <= 1e-4 * max(1.0, abs(final1[key])), key


def test_each_rank_holds_half_of_the_one_process_state(runs):
    one = json.load(open(runs["one"] / "final_metrics.json"))["rank_state_bytes"]
    two = json.load(open(runs["fsdp"] / "final_metrics.json"))["rank_state_bytes"]
    assert len(one) == 1 and len(two) == 2
    for rank in two:
        for part in ("policy", "optimizer", "reference", "init_model"):
            # dim-0 shards: half of every tensor, rounded up (odd first dims), plus Adam's step scalars
            ratio = rank[part] / one[0][part]
            assert 0.49 <= ratio <= 0.51, (part, rank[part], one[0][part])


def test_kill_9_during_a_sharded_save_then_resume_is_bit_exact(runs):
    # the kill left the save's temporary directory and no checkpoint-10; the resume removed the debris
    assert ".tmp-checkpoint-10" in runs["debris"] and "checkpoint-10" not in runs["debris"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(runs["killed"]))
    assert _losses(runs["killed"]) == _losses(runs["fsdp"])
    for sub in ("", "reference"):
        a, b = _weights(runs["export_fsdp"] / sub), _weights(runs["export_resumed"] / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    state = json.load(open(runs["killed"] / f"checkpoint-{STEPS}" / "trainer_state.json"))
    assert state["sharded"] is True and state["ref_updates"] == STEPS // 3


def test_the_reference_update_blends_local_shards_without_a_gather(runs):
    for probe in runs["probes"]:
        # resumed at step 5: updates at steps 6 and 9; each makes only the NaN flag's all-reduce
        assert probe["updates"] == 2
        # counted twice: by the patched torch.distributed function and by CommDebugMode's c10d trace
        assert probe["calls"] == {"all_reduce": 2, "traced c10d.allreduce_": 2}, probe["calls"]
        assert any("all_gather" in op and n >= 1 for op, n in probe["control"].items()), probe["control"]


def test_bf16_mixed_precision_trains_under_fsdp(runs):
    losses = _losses(runs["bf16"])
    assert [s for s, _ in losses] == [1, 2, 3]
    assert abs(losses[0][1] - 0.6931) < 1e-3  # policy = reference at step 1: loss log 2
    assert all(0.5 < l < 0.9 for _, l in losses)
    state = json.load(open(runs["bf16"] / "checkpoint-3" / "trainer_state.json"))
    assert state["sharded"] is True and state["ref_updates"] == 1
    dtypes = {sub: open(runs["bf16"] / "checkpoint-3" / sub / "weights_dtype.txt").read()
              for sub in ("", "reference")}
    assert dtypes == {"": "float32", "reference": "bfloat16"}  # fp32 master weights, bf16 reference


def test_export_writes_folders_that_eval_takes_and_eval_refuses_the_shards(runs, capsys):
    from fasttrdpo import cli

    ckpt = str(runs["fsdp"] / f"checkpoint-{STEPS}")
    assert cli.main(["eval", "--model", ckpt]) == 2
    assert "fasttrdpo export" in capsys.readouterr().err
    out = runs["fsdp"].parent / "eval.json"
    assert cli.main(["eval", "--model", str(runs["export_fsdp"]), "--eval-size", "16", "--output", str(out)]) == 0
    assert json.load(open(out))["eval_pairs"] == 16
    assert cli.main(["export", ckpt, str(runs["export_fsdp"])]) == 2  # never writes into a used folder
    assert "not empty" in capsys.readouterr().err


def test_fsdp_refuses_what_no_test_proves():
    from fasttrdpo.tiny import tiny_model, tiny_tokenizer
    from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer

    from fasttrdpo.training.fsdp import check_fsdp_config

    pairs = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8
    with pytest.raises(ValueError, match="torchrun"):  # one process
        TRDPOTrainer(tiny_model(), tiny_tokenizer(), pairs, TRDPOConfig(fsdp=True, per_device_train_batch_size=2))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        check_fsdp_config(TRDPOConfig(fsdp=True, gradient_checkpointing=True), world_size=2)
    for field in ("packing", "share_prompt"):  # fields another branch adds to TRDPOConfig
        config = TRDPOConfig(fsdp=True)
        object.__setattr__(config, field, True)
        with pytest.raises(ValueError, match=field):
            check_fsdp_config(config, world_size=2)
    with pytest.raises(ValueError, match="kto"):
        check_fsdp_config(TRDPOConfig(fsdp=True, trainer="kto"), world_size=2)
    with pytest.raises(ValueError, match="LoRA"):
        check_fsdp_config(TRDPOConfig(fsdp=True, lora_r=4, sync_ref_model=False), world_size=2)
    check_fsdp_config(TRDPOConfig(fsdp=True), world_size=2)  # what the runs above prove
