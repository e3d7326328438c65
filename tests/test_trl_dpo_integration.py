"""TRL's DPOTrainer with and without fasttrdpo's loss (fasttrdpo.integrations.trl.dpo) on a tiny GPTNeoX.

Both runs start from the same weights, see the same batches (same seed) and differ only in how the
loss is computed: TRL's fused log-probs + its loss formula vs TRDPOLoss from the hidden states. In
fp32 the per-step log-probs agree to ~1e-6 relative (different summation orders), and 8 Adam steps
keep the trajectories within 1e-4 relative — a wrong sign, mask, shift or pairing would not.

With DPOConfig(bf16=True) (TRL's default) both backbones run under accelerate's bf16 autocast; TRL's head
then rounds its operands and logits to bf16 while TRDPOLoss does fp32 math, so the two agree within the
bound derived in `_bf16_head_bound`, and with identical policy and reference the rewards are exactly 0.
"""
import math

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
                "logits/chosen", "logits/rejected", "rewards/accuracies", "entropy", "mean_token_accuracy"):
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


# ln 2 as the fp32 loss logs it: -log sigmoid(0), what a margin of exactly 0 gives
LN2_FP32 = float(-torch.nn.functional.logsigmoid(torch.zeros(())))
U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits, round to nearest)


def _first_log(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h][0]


@pytest.mark.parametrize("precision", ["bf16", "fp32", "bf16-peft"])
def test_step1_identical_policy_and_reference_gives_exactly_zero_rewards(tmp_path, precision):
    """Policy and reference start identical, so at step 1 every log-ratio is exactly 0, rewards are 0 and the loss
    ln 2 — provided both run the same computation. Before the fix, under bf16 the reference's hidden-state
    forward skipped the autocast accelerate wraps ref_model in (policy bf16, reference fp32): loss 0.693108,
    rewards/chosen 2e-05, accuracy 0.75 where TRL logs ln 2, 0, 0. "bf16-peft": the reference is the model
    with its LoRA adapter off (B = 0 at init, so the same function)."""
    bf16 = precision.startswith("bf16")
    policy = tiny_model(seed=0, hidden_size=32)
    kw = dict(args=_args(tmp_path, precision, max_steps=1, bf16=bf16), train_dataset=_dataset(2),
              processing_class=tiny_tokenizer())
    if precision.endswith("peft"):
        peft = pytest.importorskip("peft")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], task_type="CAUSAL_LM")
        trainer = FusedDPOTrainer(model=policy, peft_config=cfg, **kw)
        models = {"policy": policy}  # the reference is the same modules with the adapter off
    else:
        ref = tiny_model(seed=0, hidden_size=32)
        trainer = FusedDPOTrainer(model=policy, ref_model=ref, **kw)
        models = {"policy": policy, "ref": ref}
    # what each backbone's first matmul produced: bf16 under autocast, fp32 without
    dtypes = {name: set() for name in models}
    for name, m in models.items():
        m.gpt_neox.layers[0].mlp.dense_h_to_4h.register_forward_hook(
            lambda mod, args, out, name=name: dtypes[name].add(out.dtype))
    trainer.train()
    log = _first_log(trainer)
    want = torch.bfloat16 if bf16 else torch.float32
    assert all(seen == {want} for seen in dtypes.values()), dtypes
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert log[key] == 0.0, (key, log[key])
    assert log["loss"] == LN2_FP32
    assert log["logps/chosen"] < -10  # real log-probs (about -log(384) per completion token)


def _bf16_head_bound(model):
    """Worst-case |TRL bf16 logit - fp32 logit| for any token of `model` (GPTNeoX: final LayerNorm, lm_head).

    TRL under bf16 autocast rounds h and W to bf16 (error <= 2u·S_v, S_v = sum_i |h_i|·|W_vi|) and writes the
    logits tile in bf16 (<= u·|z_v| <= u·S_v); the fp32 accumulation in both (H·2^-24·S_v) and the u² terms
    stay under 0.1·u·S_v for H = 32, so |dz_v| <= 3.1·u·S_v. The final LayerNorm's output is gamma*xhat + beta
    with ||xhat||_2 <= sqrt(H), so by Cauchy-Schwarz S_v <= (max|gamma|·sqrt(H) + ||beta||_2)·||W_v||_2."""
    norm, weight = model.gpt_neox.final_layer_norm, model.get_output_embeddings().weight
    h_norm = norm.weight.abs().max().item() * math.sqrt(weight.shape[1]) + norm.bias.norm().item()
    return 3.1 * U_BF16 * h_norm * weight.norm(dim=1).max().item()


def test_bf16_matches_trl_within_derived_bound(tmp_path):
    """Different policy and reference, bf16, step 1 (same weights in both trainers: the only difference is
    the head's arithmetic). Per token a log-prob z_y - lse(z) moves by at most |dz_y| + max_v |dz_v| <= 2·dz;
    a sequence of T completion tokens by 2·T·dz (logps/*); rewards = beta·(policy - ref) log-probs, margins
    twice that; the sigmoid loss is 1-Lipschitz in beta·(margin of log-ratios); logits/* are means of logits."""
    def run(cls):
        policy, ref = tiny_model(seed=0, hidden_size=32), tiny_model(seed=1, hidden_size=32)
        dz = {"policy": _bf16_head_bound(policy), "ref": _bf16_head_bound(ref)}
        trainer = cls(model=policy, ref_model=ref, args=_args(tmp_path, cls.__name__, max_steps=1, bf16=True),
                      train_dataset=_dataset(2), processing_class=tiny_tokenizer())
        T = max(len(ids) for col in ("chosen_ids", "rejected_ids") for ids in trainer.train_dataset[col])
        trainer.train()
        return _first_log(trainer), {k: 2 * T * v for k, v in dz.items()}, dz

    trl, seq_bound, dz = run(DPOTrainer)
    ours, _, _ = run(FusedDPOTrainer)
    beta = 0.1
    reward_bound = beta * (seq_bound["policy"] + seq_bound["ref"])
    bounds = {"logps/chosen": seq_bound["policy"], "logps/rejected": seq_bound["policy"],
              "logits/chosen": dz["policy"], "logits/rejected": dz["policy"],
              "rewards/chosen": reward_bound, "rewards/rejected": reward_bound,
              "rewards/margins": 2 * reward_bound, "loss": 2 * reward_bound}
    assert seq_bound["policy"] < 1.0  # far below one token's log-prob (~log 384 = 5.95): a mask/shift error fails
    for key, bound in bounds.items():
        assert abs(ours[key] - trl[key]) <= bound, (key, ours[key], trl[key], bound)
    assert trl["rewards/margins"] != 0.0 and trl["loss"] != LN2_FP32  # different models: non-trivial values
