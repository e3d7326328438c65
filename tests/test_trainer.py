"""TRDPOTrainer in process: the loss it optimises, the reference updates it composes, the evaluation KL,
bf16, checkpoints on disk, and input validation. Tiny models, a handful of steps."""
import copy
import json
import os

import pytest
import torch

from fasttrdpo.data import synthetic_preference_dataset
from fasttrdpo.tiny import tiny_model, tiny_tokenizer
from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer, find_latest_checkpoint, load_weights

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                learning_rate=1e-3, logging_steps=1, save_steps=0, plot=False, disable_tqdm=True, tau=100)
    base.update(kw)
    return TRDPOConfig(**base)


def _f64_sequence_logps(model, batch):
    """Summed completion log-probs from full float64 logits (the independent reference)."""
    m = copy.deepcopy(model).double().requires_grad_(False)
    logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), logits, mask


def _count_head_calls(*models):
    calls = []
    for m in models:
        m.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_first_step_loss_equals_float64_dpo_and_no_logits_are_formed(tmp_path):
    policy, ref = tiny_model(0, **SMALL), tiny_model(1, **SMALL)
    policy0, ref0 = copy.deepcopy(policy), copy.deepcopy(ref)
    trainer = TRDPOTrainer(policy, tiny_tokenizer(), synthetic_preference_dataset(32, seed=0),
                           _config(tmp_path, beta=0.2), ref_model=ref)
    calls = _count_head_calls(trainer.model, trainer.ref_model)
    batch = trainer.collator([trainer.train_pairs[i] for i in trainer._step_indices(0)[0]])
    pol, _, _ = _f64_sequence_logps(policy0, batch)
    rf, _, _ = _f64_sequence_logps(ref0, batch)
    B = pol.shape[0] // 2
    chosen, rejected = 0.2 * (pol[:B] - rf[:B]), 0.2 * (pol[B:] - rf[B:])
    expected_loss = float(-torch.nn.functional.logsigmoid(chosen - rejected).mean())
    trainer.train()
    assert calls == []  # the lm_head module never ran: logits were never formed in training
    first = trainer.history[0]
    assert first["step"] == 1
    # fp32 log-probs: ~eps32*(|lse|+max|z|) ~ 1e-6 per token, ~20 tokens per row, times beta -> 1e-5 is ample
    assert abs(first["loss"] - expected_loss) < 1e-5
    assert abs(first["rewards/chosen"] - float(chosen.mean())) < 1e-5
    assert abs(first["rewards/margins"] - float((chosen - rejected).mean())) < 1e-5
    assert first["rewards/accuracies"] == float((chosen > rejected).double().mean())
    assert trainer.history[1]["step"] == 2 and trainer.global_step == 2


def test_reference_is_blended_at_every_tau_optimizer_steps(tmp_path):
    policy = tiny_model(0, **SMALL)
    start = copy.deepcopy(policy)
    trainer = TRDPOTrainer(policy, tiny_tokenizer(), synthetic_preference_dataset(32, seed=0),
                           _config(tmp_path, max_steps=3, tau=3, alpha=0.25))
    trainer.train()
    assert trainer.ref_updates == 1 and [r["ref_updates"] for r in trainer.history] == [0, 0, 1]
    # one blend after step 3: ref = start + 0.25 * (policy_final - start), fp32 math + one rounding
    for (name, r), p, s in zip(trainer.ref_model.named_parameters(), policy.parameters(), start.parameters()):
        expected = s.double() + 0.25 * (p.double() - s.double())
        bound = 4 * torch.finfo(torch.float32).eps * (s.double().abs() + p.double().abs())
        assert ((r.double() - expected).abs() <= bound + 1e-30).all(), name
        assert not torch.equal(r, s) or torch.equal(p, s), name

    trainer2 = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(32, seed=0),
                            _config(tmp_path / "b", max_steps=5, tau=2, alpha=1.0))
    trainer2.train()
    assert trainer2.ref_updates == 2  # steps 2 and 4


def test_evaluation_kl_and_rewards_equal_float64_full_vocabulary(tmp_path):
    policy, ref = tiny_model(0, **SMALL), tiny_model(1, **SMALL)
    policy0, ref0 = copy.deepcopy(policy), copy.deepcopy(ref)
    evals = synthetic_preference_dataset(6, seed=9)
    trainer = TRDPOTrainer(policy, tiny_tokenizer(), None, _config(tmp_path, per_device_eval_batch_size=4,
                                                                   kl_chunk_tokens=7), ref_model=ref,
                           eval_dataset=evals)
    got = trainer.evaluate()
    batch = trainer.collator(trainer.eval_pairs)
    pol, lp_logits, mask = _f64_sequence_logps(policy0, batch)
    rf, lq_logits, _ = _f64_sequence_logps(ref0, batch)
    lp, lq = torch.log_softmax(lp_logits[mask], -1), torch.log_softmax(lq_logits[mask], -1)
    kl = float((lp.exp() * (lp - lq)).sum() / mask.sum())
    B = pol.shape[0] // 2
    chosen, rejected = 0.1 * (pol[:B] - rf[:B]), 0.1 * (pol[B:] - rf[B:])
    assert got["eval_pairs"] == 6
    assert kl > 1e-3 and abs(got["eval_kl/ref"] - kl) < 1e-5 * max(1.0, kl)  # fp32 chunks vs float64
    assert got["eval_kl/init"] == 0.0  # the initial model is the policy itself before training
    assert abs(got["eval_rewards/margins"] - float((chosen - rejected).mean())) < 1e-5
    assert got["eval_rewards/accuracies"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert got["eval_init_rewards/accuracies"] == 0.0  # rewards against itself are all zero: no win


def test_bf16_autocast_bf16_reference_and_gradient_checkpointing(tmp_path):
    policy = tiny_model(0, **SMALL)
    evals = synthetic_preference_dataset(4, seed=9)
    trainer = TRDPOTrainer(policy, tiny_tokenizer(), synthetic_preference_dataset(16, seed=0),
                           _config(tmp_path, bf16=True, ref_dtype="bfloat16", gradient_checkpointing=True,
                                   tau=1, alpha=0.5), eval_dataset=evals)
    calls = _count_head_calls(trainer.model, trainer.ref_model)
    final = trainer.train()
    assert calls == []
    assert getattr(trainer.model, "is_activation_checkpointing", None) or trainer.model.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    assert all(p.dtype == torch.bfloat16 for p in trainer.ref_model.parameters())
    assert trainer.ref_updates == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history if "loss" in r)
    assert final["eval_kl/ref"] >= 0 and final["eval_kl/init"] > 0


def test_checkpoints_are_complete_rotated_and_reloadable(tmp_path):
    cfg = _config(tmp_path, max_steps=6, save_steps=2, save_total_limit=2, tau=2, alpha=0.5)
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(32, seed=0), cfg)
    trainer.train()
    out = cfg.output_dir
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-4", "checkpoint-6"]
    assert not any(n.startswith((".tmp", ".trash")) for n in names)
    ckpt = os.path.join(out, "checkpoint-6")
    for f in ("model.safetensors", "config.json", "reference/model.safetensors", "trainer_state.pt",
              "trainer_state.json", "rng_state_0.pt"):
        assert os.path.exists(os.path.join(ckpt, f)), f
    # a temporary (interrupted) save and a directory without trainer_state.pt are never "latest"
    os.makedirs(os.path.join(out, ".tmp-checkpoint-8"))
    os.makedirs(os.path.join(out, "checkpoint-10"))
    assert find_latest_checkpoint(out) == ckpt
    fresh = tiny_model(5, **SMALL)
    load_weights(fresh, ckpt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trainer.model.parameters()))
    load_weights(fresh, os.path.join(ckpt, "reference"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trainer.ref_model.parameters()))


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    import fasttrdpo.training.checkpoint as tr

    cfg = _config(tmp_path, max_steps=2, save_steps=2)
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(16, seed=0), cfg)
    trainer.train()
    good = find_latest_checkpoint(cfg.output_dir)
    assert good.endswith("checkpoint-2")
    real_save, calls = tr.save_weights, []

    def dies_on_the_reference(model, folder):
        calls.append(folder)
        if len(calls) == 2:  # the policy is written, the process "dies" while writing the reference
            raise KeyboardInterrupt
        real_save(model, folder)

    monkeypatch.setattr(tr, "save_weights", dies_on_the_reference)
    trainer.global_step = 3
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert os.path.isdir(os.path.join(cfg.output_dir, ".tmp-checkpoint-3"))
    assert find_latest_checkpoint(cfg.output_dir) == good  # the half-written save is invisible
    monkeypatch.setattr(tr, "save_weights", real_save)
    trainer.global_step = 4
    trainer.save_checkpoint()  # the next save clears the leftover and lands complete
    assert find_latest_checkpoint(cfg.output_dir).endswith("checkpoint-4")
    assert not os.path.exists(os.path.join(cfg.output_dir, ".tmp-checkpoint-3"))


def test_in_process_resume_is_exact(tmp_path):
    # constant schedule: a 3-step run then resumed to 5 steps follows the same learning rates as 5 in one go
    data = synthetic_preference_dataset(32, seed=0)
    kw = dict(tau=2, alpha=0.5, lr_scheduler_type="constant")
    straight = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data, _config(tmp_path / "a", max_steps=5, **kw))
    straight.train()
    part = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data, _config(tmp_path / "b", max_steps=3, **kw))
    part.train()
    resumed = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data,
                           _config(tmp_path / "b", max_steps=5, resume_from_checkpoint="latest", **kw))
    resumed.train()
    assert resumed.ref_updates == 2
    assert straight.fingerprints() == resumed.fingerprints()  # policy and reference bit-identical
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


def test_data_order_is_a_function_of_the_step(tmp_path):
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(18, seed=0),
                           _config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert trainer.steps_per_epoch == 4  # 18 // 4: the last partial global batch is dropped
    epoch0 = [i for s in range(4) for mb in trainer._step_indices(s) for i in mb]
    assert len(epoch0) == 16 and len(set(epoch0)) == 16
    assert trainer._step_indices(2) == trainer._step_indices(2)
    assert trainer._step_indices(4) != trainer._step_indices(0)  # a new permutation each epoch


def test_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        TRDPOConfig(alpha=1.5)
    with pytest.raises(ValueError, match="tau"):
        TRDPOConfig(tau=0)
    with pytest.raises(ValueError, match="ref_dtype"):
        TRDPOConfig(ref_dtype="int8")
    tok = tiny_tokenizer()
    with pytest.raises(TypeError, match="TRDPOConfig"):
        TRDPOTrainer(tiny_model(0, **SMALL), tok, synthetic_preference_dataset(8), {"beta": 0.1})
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TRDPOTrainer(tiny_model(0, **SMALL), tok, synthetic_preference_dataset(3), _config(tmp_path))
    with pytest.raises(TypeError, match="lm_head"):
        TRDPOTrainer(tiny_model(0, **SMALL).gpt_neox, tok, synthetic_preference_dataset(8), _config(tmp_path))
    capped = tiny_model(0, **SMALL)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        TRDPOTrainer(capped, tok, synthetic_preference_dataset(8), _config(tmp_path))
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tok, synthetic_preference_dataset(8),
                           _config(tmp_path, resume_from_checkpoint="latest"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.train()


def _tiny_gpt2(seed=0, dropout=0.1):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=384, n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def test_dropout_is_disabled_by_default_as_in_trl(tmp_path):
    # GPT-2 configs carry dropout 0.1. Step 1 with the reference a copy of the policy: with dropout off
    # (TRL's disable_dropout=True) both forwards are the same fp32 computation on the same weights, so the
    # log-ratios are exactly 0, the rewards exactly 0 and the loss -log(sigmoid(0)) = ln 2 up to the
    # rounding of that one fp32 expression (a few ulp of 0.69: 1e-7). With dropout the loss was 0.7067.
    import math

    data = synthetic_preference_dataset(16, seed=0)
    trainer = TRDPOTrainer(_tiny_gpt2(), tiny_tokenizer(), data, _config(tmp_path, max_steps=1))
    trainer.train()
    first = trainer.history[0]
    assert abs(first["loss"] - math.log(2)) < 1e-7, first["loss"]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert all(m.p == 0 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))
    # disable_dropout=False keeps the model's dropout (the policy then differs from its own reference)
    kept = TRDPOTrainer(_tiny_gpt2(), tiny_tokenizer(), data,
                        _config(tmp_path / "kept", max_steps=1, disable_dropout=False))
    kept.train()
    assert abs(kept.history[0]["loss"] - math.log(2)) > 1e-4 and kept.history[0]["rewards/margins"] != 0.0
    assert any(m.p == 0.1 for m in kept.model.modules() if isinstance(m, torch.nn.Dropout))


def test_train_returns_the_last_training_record_without_an_eval_set(tmp_path):
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(16, seed=0),
                           _config(tmp_path, max_steps=3, logging_steps=2))
    final = trainer.train()
    assert final["step"] == 3 and final == trainer.history[-1] and final["loss"] > 0


@pytest.mark.parametrize("name,kwargs", [("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("polynomial", {"power": 2.0}),
                                         ("constant_with_warmup", None), ("inverse_sqrt", None)])
def test_learning_rates_follow_transformers_get_scheduler(tmp_path, name, kwargs):
    # the logged learning rate of step s is get_scheduler's on a scratch optimizer before its s-th step
    from transformers import get_scheduler

    steps, warmup = 5, 2
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(24, seed=0),
                           _config(tmp_path, max_steps=steps, warmup_steps=warmup, lr_scheduler_type=name,
                                   lr_scheduler_kwargs=kwargs))
    trainer.train()
    scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_scheduler(name, scratch, num_warmup_steps=warmup, num_training_steps=steps,
                          scheduler_specific_kwargs=kwargs or {})
    expected = []
    for _ in range(steps):
        expected.append(scratch.param_groups[0]["lr"])
        scratch.step()
        sched.step()
    got = [r["learning_rate"] for r in trainer.history]
    # the same float64 lambda times the same base rate: equal up to one rounding of the product
    assert got == pytest.approx(expected, rel=1e-12, abs=0), (got, expected)


def test_metric_driven_schedules_need_an_evaluation(tmp_path, monkeypatch):
    data = synthetic_preference_dataset(16, seed=0)
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data,
                     _config(tmp_path, lr_scheduler_type="reduce_lr_on_plateau"))
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        TRDPOConfig(lr_scheduler_type="bogus")
    # with evaluations it is stepped on eval_loss: patience 0 and a rising eval loss halve the rate
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data,
                           _config(tmp_path / "p", max_steps=3, eval_steps=1, lr_scheduler_type="reduce_lr_on_plateau",
                                   lr_scheduler_kwargs={"patience": 0, "factor": 0.5}),
                           eval_dataset=synthetic_preference_dataset(4, seed=3))
    stepped, real_step = [], torch.optim.lr_scheduler.ReduceLROnPlateau.step
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step",
                        lambda self, metric: (stepped.append(metric), real_step(self, metric)))
    trainer.train()
    evals = [r for r in trainer.history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert stepped == [evals[1]["eval_loss"], evals[2]["eval_loss"]]  # the periodic evaluations, as HF's Trainer


def _fake_checkpoint(out, step, run_id, run_name=None):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"run_id": run_id, "run_name": run_name}))
    return path


def test_a_new_run_refuses_an_output_dir_holding_another_runs_checkpoints(tmp_path):
    from fasttrdpo.trainer import OutputDirError

    data = synthetic_preference_dataset(16, seed=0)
    first = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data, _config(tmp_path, max_steps=4, save_steps=2))
    first.train()
    out = tmp_path / "out"
    state = json.load(open(out / "checkpoint-4" / "trainer_state.json"))
    assert state["run_id"] == first.run_id and len(first.run_id) == 32
    before = sorted(os.listdir(out))
    second = TRDPOTrainer(tiny_model(1, **SMALL), tiny_tokenizer(), data, _config(tmp_path, max_steps=2, save_steps=1))
    with pytest.raises(OutputDirError, match="--overwrite-output-dir.*--resume") as err:
        second.train()
    assert "\n" not in str(err.value) and first.run_id in str(err.value)
    assert sorted(os.listdir(out)) == before and second.global_step == 0  # nothing written, nothing trained
    # --overwrite-output-dir: the old run's checkpoints and records go, the new run's stay
    third = TRDPOTrainer(tiny_model(1, **SMALL), tiny_tokenizer(), data,
                         _config(tmp_path, max_steps=2, save_steps=1, overwrite_output_dir=True))
    third.train()
    ckpts = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-1", "checkpoint-2"]
    assert {json.load(open(out / n / "trainer_state.json"))["run_id"] for n in ckpts} == {third.run_id}
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))] == [1, 2]


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    from fasttrdpo.training.output_dir import rotate_checkpoints

    out = tmp_path / "out"
    for step in (20, 30):
        _fake_checkpoint(out, step, "old")
    for step in (5, 10, 15):
        _fake_checkpoint(out, step, "new")
    (out / "checkpoint-99").mkdir()  # no state: nobody's, never rotated
    rotate_checkpoints(str(out), 2, "new")
    assert sorted(os.listdir(out)) == ["checkpoint-10", "checkpoint-15", "checkpoint-20", "checkpoint-30",
                                       "checkpoint-99"]


def test_the_lock_refuses_a_second_writer_until_the_first_is_killed(tmp_path):
    import signal
    import subprocess
    import sys

    from fasttrdpo.trainer import OutputDirError

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fasttrdpo.training.output_dir import OutputDirLock; "
         "OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        data = synthetic_preference_dataset(16, seed=0)
        trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data, _config(tmp_path, max_steps=1))
        with pytest.raises(OutputDirError, match=f"in use by another fasttrdpo process \\(pid {holder.pid}"):
            trainer.train()
        assert trainer.global_step == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel dropped the lock with the process; the lock file and a final/ folder are not "another run"
    (out / "final").mkdir()
    assert os.path.exists(out / ".fasttrdpo.lock")
    trainer.train()
    assert trainer.global_step == 1 and os.path.isdir(out / "checkpoint-1")


def test_num_tokens_is_trls_dpo_trainers(tmp_path):
    """num_tokens is TRL 1.16 DPOTrainer's: the running total of attention_mask over every micro-batch (chosen and
    rejected rows, prompt + completion, no padding), equal per step on the same rows in the same order. TRL's
    sampler is made sequential (it has no option to keep the order) and fed the rows in our step order; the
    synthetic rows differ in length, so padding or a prompt counted once would show."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    steps, batch, accum = 3, 2, 2
    data = synthetic_preference_dataset(steps * batch * accum, seed=3)
    cfg = _config(tmp_path, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                  max_length=64)
    ours = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), data, cfg)
    order = [i for s in range(steps) for mb in ours._step_indices(s) for i in mb]
    ours.train()
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                     gradient_accumulation_steps=accum, learning_rate=1e-3, logging_steps=1, report_to=[],
                     use_cpu=True, seed=0, max_length=64, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, bf16=False, fp16=False)
    trl = InOrder(model=tiny_model(0, **SMALL), ref_model=tiny_model(0, **SMALL), args=args,
                  train_dataset=Dataset.from_list([data[i] for i in order]), processing_class=tiny_tokenizer())
    trl.train()
    trl_counts = [h["num_tokens"] for h in trl.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["num_tokens"] for h in ours.history if "loss" in h] == trl_counts and len(trl_counts) == steps
    assert ours.num_tokens == trl_counts[-1] > 0
