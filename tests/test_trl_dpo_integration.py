"""TRL's DPOTrainer with and without fasttrdpo's loss (fasttrdpo.integrations.trl.dpo) on a tiny GPTNeoX.

Both runs start from the same weights, see the same batches (same seed) and differ only in how the
loss is computed: TRL's fused log-probs + its loss formula vs TRDPOLoss from the hidden states. In
fp32 the per-step log-probs agree to ~1e-6 relative (different summation orders), and 8 Adam steps
keep the trajectories within 1e-4 relative — a wrong sign, mask, shift or pairing would not.
"""
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fasttrdpo.integrations.trl.dpo import FusedDPOTrainer, use_trdpo_loss  # noqa: E402
from fasttrdpo.tiny import tiny_model, tiny_tokenizer  # noqa: E402

STEPS = 8


def _dataset(n=STEPS * 2):
    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "tree", "blue", "sun", "rain", "sky", "red", "stone", "river"]
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))  # noqa: E731
    rows = [{"prompt": f"Q: {pick(2)}?", "chosen": f" {pick(2)}.", "rejected": f" {pick(3)}!"} for _ in range(n)]
    return Dataset.from_list(rows)


def _args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=3e-3,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, beta=0.1, max_length=48, save_strategy="no",
                disable_tqdm=True, lr_scheduler_type="constant", dataloader_num_workers=0,
                bf16=False, fp16=False)  # fp32 throughout (DPOConfig defaults to bf16 autocast where supported)
    base.update(kw)
    return DPOConfig(**base)


def _train(trainer_cls, tmp_path, name, **kw):
    model, ref = tiny_model(seed=0, hidden_size=32), tiny_model(seed=0, hidden_size=32)
    trainer = trainer_cls(model=model, ref_model=ref, args=_args(tmp_path, name, **kw), train_dataset=_dataset(),
                          processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return trainer, logs


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_same_loss_trajectory_as_trl(tmp_path, loss_type):
    _, trl_logs = _train(DPOTrainer, tmp_path, "trl", loss_type=[loss_type])
    trainer, ours_logs = _train(FusedDPOTrainer, tmp_path, "ours", loss_type=[loss_type])
    assert len(trl_logs) == len(ours_logs) == STEPS
    trl_loss = torch.tensor([h["loss"] for h in trl_logs], dtype=torch.float64)
    our_loss = torch.tensor([h["loss"] for h in ours_logs], dtype=torch.float64)
    # the policy must actually move, or equal trajectories would prove nothing
    assert float((trl_loss[0] - trl_loss[-1]).abs()) > 1e-3 * float(trl_loss[0].abs())
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-4, atol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "rewards/accuracies"):
        a = torch.tensor([h[key] for h in ours_logs], dtype=torch.float64)
        b = torch.tensor([h[key] for h in trl_logs], dtype=torch.float64)
        # metrics of a step are computed before its update, from the same weights up to the trajectory drift
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
    assert trainer._trdpo_loss.loss_type == loss_type


def test_use_trdpo_loss_switch_and_unsupported_settings(tmp_path):
    model, ref = tiny_model(seed=1, hidden_size=32), tiny_model(seed=1, hidden_size=32)
    trainer = DPOTrainer(model=model, ref_model=ref, args=_args(tmp_path, "switch", max_steps=1),
                         train_dataset=_dataset(2), processing_class=tiny_tokenizer())
    assert use_trdpo_loss(trainer, backend="eager") is trainer
    trainer.train()
    assert trainer._trdpo_loss.backend == "eager"
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 1 and "rewards/margins" in logs[0] and "num_tokens" in logs[0]

    # (every TRL loss type and weighted lists are supported: tests/test_loss_family.py)
    for kw, exc in [(dict(use_weighting=True), NotImplementedError),
                    (dict(f_divergence_type="js_divergence"), NotImplementedError),
                    (dict(label_smoothing=0.1), ValueError),
                    (dict(ld_alpha=0.5), NotImplementedError)]:
        t = DPOTrainer(model=tiny_model(seed=1, hidden_size=32), ref_model=tiny_model(seed=1, hidden_size=32),
                       args=_args(tmp_path, "bad", max_steps=1, **kw), train_dataset=_dataset(2),
                       processing_class=tiny_tokenizer())
        with pytest.raises(exc):
            use_trdpo_loss(t)


def test_peft_adapter_reference_matches_trl(tmp_path):
    # With PEFT and no ref_model, the reference is the base model with the adapter off (TRL's use_adapter)
    peft = pytest.importorskip("peft")

    def run(cls, name):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense"], task_type="CAUSAL_LM")
        trainer = cls(model=tiny_model(seed=0, hidden_size=32), args=_args(tmp_path, name, max_steps=4),
                      train_dataset=_dataset(), processing_class=tiny_tokenizer(), peft_config=cfg)
        trainer.train()
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h],
                            dtype=torch.float64)

    trl_loss, our_loss = run(DPOTrainer, "trl"), run(FusedDPOTrainer, "ours")
    assert float((trl_loss[0] - trl_loss[-1]).abs()) > 1e-3 * float(trl_loss[0])
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-4, atol=0)
