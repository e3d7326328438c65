"""TR-KTO (issue 16 item 5): TRKTOTrainer against TRL 1.16's KTOTrainer, and the moving reference.

1. Data: `tokenize_unpaired_dataset` + `UnpairedCollator` give the token ids, completion masks and mismatched KL
   sequences of TRL's own `KTOTrainer._prepare_dataset` + `DataCollatorForUnpairedPreference` (run on a bare
   trainer namespace) for text rows (a BPE adding a BOS, ByT5), conversational rows through a chat template,
   paired rows (unpaired in TRL's order) and keep_start truncation (long prompts dropped, sequences cut).
2. End to end with sync_ref_model=False: TRL's KTOTrainer and TRKTOTrainer, same weights, same rows in the same
   order, fp32, 3 optimizer steps of 2 micro-batches: every logged value (loss and TRL's KTO metric names) per step.
   The same in bf16 (TRL's default bf16=True), 2 steps, within a bound derived from bf16 rounding of TRL's head.
3. Sync on: every update is θ_ref ← θ_ref + α·(θ − θ_ref) of the policy at that step (float64 reference), and
   with α = 1 the next step's rewards and KL are exactly 0 (the loss reads the moved reference).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import KTOConfig, KTOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference  # noqa: E402

from fasttrdpo.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from fasttrdpo.trainer import TRDPOConfig, TRKTOTrainer  # noqa: E402
from fasttrdpo.unpaired_data import UnpairedCollator, tokenize_unpaired_dataset  # noqa: E402

WORDS = ["cat", "dog", "tree", "blue", "sun", "rain", "sky", "red", "stone", "river"]


def _text_rows(n, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))  # noqa: E731
    return [{"prompt": f"Q: {pick(1 + i % 3)}?", "completion": f" {pick(2 + i % 2)}.", "label": bool(lab)}
            for i, lab in zip(range(n), labels)]


def _m(role, content):
    return {"role": role, "content": content}


CONV_ROWS = [
    {"prompt": [_m("user", "What is the sky?")], "completion": [_m("assistant", "Blue.")], "label": True},
    {"prompt": [_m("system", "Be brief."), _m("user", "Say hello")], "completion": [_m("assistant", "hello world")],
     "label": False},
    {"prompt": [_m("user", "Café ☕?")], "completion": [_m("assistant", "très bien")], "label": True},
    {"prompt": [_m("user", "again")], "completion": [_m("assistant", "help me")], "label": False},
]
PAIRED_ROWS = [{"prompt": "Say hello", "chosen": " hello world", "rejected": " help me"},
               {"prompt": "Question: what is the sky?", "chosen": " Answer: blue.", "rejected": " there"},
               {"prompt": "hello", "chosen": " there", "rejected": " world please"}]


def _trl_batches(tok, rows, batch_size, max_length):
    """TRL's KTOTrainer processing (its own methods): _prepare_dataset, then its collator per batch."""
    args = KTOConfig(output_dir="unused", max_length=max_length, per_device_train_batch_size=batch_size,
                     report_to=[], use_cpu=True, dataset_num_proc=None)
    bare = SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    data = list(KTOTrainer._prepare_dataset(bare, Dataset.from_list(rows), tok, args, "train"))
    collate = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    return [collate(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]


def _rows_of(ids, mask, attn):
    """Per row: (token ids, completion mask) without padding."""
    return [(i[a.bool()].tolist(), m[a.bool()].tolist()) for i, m, a in zip(ids, mask, attn)]


def _ours_as_trl(batch):
    """Our shifted labels back to TRL's completion mask (the first token of a sequence is never a target)."""
    out = {}
    for pre in ("", "kl_"):
        ids, attn, labels = batch[f"{pre}input_ids"], batch[f"{pre}attention_mask"], batch[f"{pre}labels"]
        mask = torch.zeros_like(ids)
        mask[:, 1:] = (labels[:, :-1] != -100).long()
        out[pre] = _rows_of(ids, mask, attn)
    return out


def _bpe_bos():
    from test_tokenize_like_trl import _bpe

    return _bpe(True)


@pytest.mark.parametrize("case", ["text-bpe_bos", "text-byt5", "conversational", "paired", "keep_start-truncated"])
def test_tokens_and_kl_rows_match_trl(case):
    from test_chat_data import TEMPLATES

    tok = _bpe_bos() if case == "text-bpe_bos" else tiny_tokenizer()
    max_length, B = 1024, 2
    if case.startswith("text"):
        rows = _text_rows(6, [1, 0, 1, 1, 0, 0])
    elif case == "conversational":
        tok.chat_template = TEMPLATES["think"]  # the generation prompt is not a prefix of the finished turn
        rows = CONV_ROWS
    elif case == "paired":
        rows, B = PAIRED_ROWS, 3
    else:  # two prompts fill max_length (dropped), others keep their first max_length tokens, KL rows too
        rows = _text_rows(8, [1, 0] * 4)
        rows[2]["prompt"] = "Q: " + "a very long prompt " * 3
        rows[5]["prompt"] = "Q: " + "x" * 40
        max_length = 14
    trl = _trl_batches(tok, rows, B, max_length)
    examples = tokenize_unpaired_dataset(Dataset.from_list(rows), tok, max_length=max_length,
                                         truncation_mode="keep_start")
    collate = UnpairedCollator(tok.pad_token_id, max_length)
    ours = [collate(examples[i:i + B]) for i in range(0, len(examples), B)]
    assert len(ours) == len(trl) and sum(len(b["label"]) for b in trl) == len(examples)
    expected_rows = {"paired": 6, "keep_start-truncated": 6}.get(case, len(rows))
    assert len(examples) == expected_rows
    for mine, theirs in zip(ours, trl):
        got = _ours_as_trl(mine)
        assert got[""] == _rows_of(theirs["input_ids"], theirs["completion_mask"], theirs["attention_mask"])
        assert got["kl_"] == _rows_of(theirs["KL_input_ids"], theirs["KL_completion_mask"], theirs["KL_attention_mask"])
        assert mine["desirable"].tolist() == theirs["label"].tolist()
    if case == "keep_start-truncated":  # the case is what it claims: some sequences were cut to max_length
        assert any(len(ids) == max_length for b in ours for ids, _ in _ours_as_trl(b)["kl_"])
    if case == "paired":  # TRL's order: the chosen completions of the block, then the rejected ones
        assert [e.desirable for e in examples] == [True] * 3 + [False] * 3


def test_conversational_rows_need_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        tokenize_unpaired_dataset(CONV_ROWS, tiny_tokenizer(), max_length=64)


def test_bad_rows_and_settings_raise():
    rows = _text_rows(4, [1, 0, 1, 0])
    with pytest.raises(ValueError, match="label"):
        tokenize_unpaired_dataset([dict(rows[0], label=1)] + rows[1:], tiny_tokenizer(), max_length=64)
    with pytest.raises(ValueError, match="trainer="):
        TRDPOConfig(desirable_weight=2.0)  # a KTO setting on a DPO run is not silently ignored
    with pytest.raises(ValueError, match="loss_type"):
        TRDPOConfig(trainer="kto", loss_type="ipo")
    with pytest.raises(ValueError, match="discopop_tau"):
        TRDPOConfig(trainer="kto", discopop_tau=0.5)  # a DPO loss setting on a KTO run is not silently ignored
    cfg = TRDPOConfig(trainer="kto", per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        TRKTOTrainer(tiny_model(seed=0, hidden_size=32), tiny_tokenizer(), rows, cfg)
    from fasttrdpo.trainer import TRDPOTrainer

    with pytest.raises(ValueError, match="TRKTOTrainer"):
        TRDPOTrainer(tiny_model(seed=0, hidden_size=32), tiny_tokenizer(), PAIRED_ROWS, TRDPOConfig(trainer="kto"))


# ---------------------------------------------------------------------------------------------------------------
# End to end against TRL's KTOTrainer (sync off)
STEPS, B, ACCUM = 3, 4, 2
LR = 3e-3
KEYS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
        "logits/chosen", "logits/rejected")


def _models():
    """Policy and a different reference (its lm_head 3x sharper), so the KL estimate z is > 0 and enters the loss."""
    model, ref = tiny_model(seed=0, hidden_size=32), tiny_model(seed=0, hidden_size=32)
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(3.0)
    return model, ref


def _config(tmp_path, **kw):
    base = dict(trainer="kto", output_dir=str(tmp_path / "ours"), max_steps=STEPS, per_device_train_batch_size=B,
                gradient_accumulation_steps=ACCUM, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1,
                save_steps=0, plot=False, disable_tqdm=True, max_length=48, truncation_mode="keep_start",
                desirable_weight=1.3, undesirable_weight=0.7, eval_kl=False, seed=0)
    base.update(kw)
    return TRDPOConfig(**base)


def _our_order(cfg, n):
    """The row order TRKTOTrainer trains on (its own step -> indices map)."""
    probe = SimpleNamespace(config=cfg, steps_per_epoch=n // (B * ACCUM), train_pairs=range(n),
                            global_batch_size=B * ACCUM, world_size=1, rank=0)
    probe._step_rows = lambda step: TRKTOTrainer._step_rows(probe, step)
    return [i for s in range(STEPS) for mb in TRKTOTrainer._step_indices(probe, s) for i in mb]


def test_same_numbers_as_trl_kto_trainer(tmp_path):
    n = STEPS * B * ACCUM
    cfg = _config(tmp_path, sync_ref_model=False)
    order = _our_order(cfg, n)
    assert cfg.train_sampling_strategy == "auto" and order == list(range(n))  # TRL's sequential order
    # labels by training position: micro-batch 1 is all desirable (TRL logs no rewards/rejected for it, and the
    # step's value is the other micro-batch's alone), the others mixed
    labels_in_order = [1, 1, 1, 1] + [1, 0, 0, 1] + [0, 1, 0, 0] + [1, 0, 1, 0] + [0, 0, 1, 1] + [1, 0, 0, 0]
    rows = _text_rows(n, [0] * n)
    for pos, i in enumerate(order):
        rows[i]["label"] = bool(labels_in_order[pos])

    model, ref = _models()
    ours = TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref)
    ours.train()
    our_logs = [h for h in ours.history if "loss" in h]

    model, ref = _models()
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, gradient_accumulation_steps=ACCUM,
                     max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                     use_cpu=True, seed=0, beta=0.1, max_length=48, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
                     desirable_weight=1.3, undesirable_weight=0.7, sync_ref_model=False)
    trl = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=tiny_tokenizer())
    trl.train()
    trl_logs = [h for h in trl.state.log_history if "loss" in h and "train_runtime" not in h]

    assert len(our_logs) == len(trl_logs) == STEPS
    get = lambda logs, k: torch.tensor([h[k] for h in logs], dtype=torch.float64)  # noqa: E731
    loss = get(trl_logs, "loss")
    assert float((loss[0] - loss[-1]).abs()) > 1e-3 * float(loss[0])  # the policy moved
    assert bool((get(trl_logs, "kl") > 0.1).all())  # z is active: a wrong KL pairing moves every number
    # fp32 sums over <= 48 tokens x V=384 that differ from TRL's in summation order only (~1e-7 relative per
    # log-prob); 3 Adam steps at lr 3e-3 keep the trajectories within 1e-5 relative
    torch.testing.assert_close(get(our_logs, "loss"), loss, rtol=1e-5, atol=0)
    # entropy (log_token_stats, on by default): TRL's per-micro-batch Σ entropy / Σ completion tokens, fp32 per
    # token as the log-probs, so the same bound
    for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy"):
        torch.testing.assert_close(get(our_logs, key), get(trl_logs, key), rtol=1e-5, atol=1e-6, msg=key)
    # rewards = β·(π − π_ref) and kl = mean(π − π_ref) on the KL rows: differences of two fp32 sums each held to
    # 1e-5 relative above, so the bound is absolute, from the log-probs' magnitude (as test_loss_family derives)
    mag_c, mag_r = get(trl_logs, "logps/chosen").abs(), get(trl_logs, "logps/rejected").abs()
    mag = torch.maximum(mag_c, mag_r)
    for key, atol in (("rewards/chosen", 2 * 0.1 * 1e-5 * mag_c), ("rewards/rejected", 2 * 0.1 * 1e-5 * mag_r),
                      ("rewards/margins", 2 * 0.1 * 1e-5 * (mag_c + mag_r)), ("kl", 2 * 1e-5 * 3 * mag)):
        err = (get(our_logs, key) - get(trl_logs, key)).abs()
        assert bool((err <= atol).all()), (key, err.tolist(), atol.tolist())
    for h in our_logs:  # TRL's KTO metric names, no DPO-only ones
        assert set(KEYS) <= set(h) and "rewards/accuracies" not in h
    # num_tokens: TRL's running total of the rows' attention_mask (not the KL rows') over every micro-batch so far:
    # integers, equal exactly (rows of different lengths: padding, KL rows or prompts miscounted would show)
    assert [h["num_tokens"] for h in our_logs] == [h["num_tokens"] for h in trl_logs]



def test_same_numbers_as_trl_kto_trainer_in_bf16(tmp_path):
    """TRL's default bf16=True: both run the same backbone under bf16 autocast; 2 steps, every KTO metric per step."""
    steps, n = 2, 2 * B * ACCUM
    cfg = _config(tmp_path, sync_ref_model=False, bf16=True, max_steps=steps)
    assert _our_order(cfg, n)[:n] == list(range(n))  # TRL's sequential order
    rows = _text_rows(n, [1, 1, 1, 1] + [1, 0, 0, 1] + [0, 1, 0, 0] + [1, 0, 1, 0])

    model, ref = _models()
    ours = TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref)
    # the tolerance's scale, measured before training on the autocast hidden states of every row and KL row:
    # A = max over tokens and vocabulary of sum_k |h_k| |W_jk| (policy head on its hiddens, reference head on its),
    # T = the most completion tokens of a row
    A, T = 0.0, 0
    for s in range(steps):
        for idx in TRKTOTrainer._step_indices(ours, s):
            batch = ours._batch([ours.train_pairs[i] for i in idx])
            with torch.no_grad():
                hidden, kl_hidden, ref_hidden = ours._hiddens(batch, ours.policy)
            Bm = hidden.shape[0]
            for h, w, lab in ((hidden, ours.policy.head.weight, batch["labels"]),
                              (kl_hidden, ours.policy.head.weight, batch["kl_labels"]),
                              (ref_hidden[:Bm], ours.ref_head.weight, batch["labels"]),
                              (ref_hidden[Bm:], ours.ref_head.weight, batch["kl_labels"])):
                valid = lab != -100
                A = max(A, float((h[valid].float().abs() @ w.float().abs().t()).max()))
                T = max(T, int(valid.sum(1).max()))
    ours.train()
    our_logs = [h for h in ours.history if "loss" in h]

    model, ref = _models()
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, gradient_accumulation_steps=ACCUM,
                     max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                     use_cpu=True, seed=0, beta=0.1, max_length=48, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, bf16=True, fp16=False, gradient_checkpointing=False,
                     desirable_weight=1.3, undesirable_weight=0.7, sync_ref_model=False)
    trl = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=tiny_tokenizer())
    trl.train()
    trl_logs = [h for h in trl.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(our_logs) == len(trl_logs) == steps
    get = lambda logs, k: torch.tensor([h[k] for h in logs], dtype=torch.float64)  # noqa: E731
    assert bool((get(trl_logs, "kl") > 0.1).all())  # z is active

    # Derivation. The backbones are the same modules under the same autocast, so their (fp32, after the final
    # LayerNorm) hidden states agree; the heads differ: TRL's fused head (trl.kernels.chunked_logprob) casts hidden
    # and W to the autocast dtype and writes the logits in bf16, ours keeps fp32 logits. With u = 2^-8 (bf16's unit
    # roundoff) each TRL logit is off by at most (2u for the two rounded inputs + u for the rounded output) * A =
    # 3uA (fp32 accumulation of H = 32 products adds ~1e-6, negligible). A token's log-prob l_y - logsumexp(l) and
    # its entropy move by at most twice the largest logit error: e_tok = 6uA. W's rounding is the same for every
    # token (not independent across tokens), so a row's sum of T log-probs moves by at most seq = T e_tok. This is
    # a worst case: the measured differences are ~1e-3 of it (rounding errors mostly cancel). Step 2 starts from
    # Adam's first step lr*sign(g) of either run; the signs differ only on gradient components below the rounding
    # noise, so the same bound is used.
    u = 2.0 ** -8
    e_tok = 6 * u * A
    seq = T * e_tok
    # below one token's log-prob (~log 384 = 5.95 for these near-uniform models): a mask, shift or KL-row pairing
    # error moves logps/* and kl by whole tokens and fails
    assert seq < 1.0, seq
    beta, w_max = 0.1, 1.3
    bounds = {"logps/chosen": seq, "logps/rejected": seq,  # means of row sums
              "rewards/chosen": beta * 2 * seq, "rewards/rejected": beta * 2 * seq,  # beta (pi - pi_ref)
              "rewards/margins": beta * 4 * seq, "kl": 2 * seq,  # mean of pi - pi_ref over the KL rows
              "logits/chosen": 3 * u * A, "logits/rejected": 3 * u * A,  # means of logits
              "entropy": e_tok,  # token mean of per-token entropies
              # w (1 - sigmoid(beta (d - z))) has slope <= w beta / 4 in d and z, each off by <= 2 seq
              "loss": w_max * beta / 4 * 4 * seq}
    for key, bound in bounds.items():
        err = (get(our_logs, key) - get(trl_logs, key)).abs()
        assert bool((err <= bound).all()), (key, err.tolist(), bound)

def test_sync_on_blends_the_reference_per_update(tmp_path):
    rows = _text_rows(8, [1, 0, 0, 1, 1, 1, 0, 0])
    alpha = 0.6
    cfg = _config(tmp_path, max_steps=4, gradient_accumulation_steps=1, tau=2, alpha=alpha, sync_ref_model=True)
    model, ref = _models()
    trainer = TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref)
    seen = []
    real_step = trainer.updater.step

    def step(global_step):
        before = [p.detach().double().clone() for p in trainer.ref_model.parameters()]
        policy = [p.detach().double().clone() for p in trainer.model.parameters()]
        fired = real_step(global_step)
        after = [p.detach().double().clone() for p in trainer.ref_model.parameters()]
        seen.append((global_step, fired, before, policy, after))
        return fired

    trainer.updater.step = step
    trainer.train()
    assert [(s, f) for s, f, *_ in seen] == [(1, False), (2, True), (3, False), (4, True)]
    for _, fired, before, policy, after in seen:
        for b, p, a in zip(before, policy, after):
            expected = b + alpha * (p - b) if fired else b
            # fp32 evaluation of b + α·(p − b) (DESIGN.md §4): the difference, α (0.6 rounded to fp32), the product
            # and the sum each round once: |error| <= u·(|result| + 3·|α·(p − b)|), u = 2^-24; bound with margin 2
            u = 2.0 ** -24
            assert bool(((a - expected).abs() <= 2 * u * (expected.abs() + 3 * alpha * (p - b).abs())).all())
    assert any(not torch.equal(b, a) for _, f, b, _, a in seen if f for b, a in zip(b, a))


def test_hard_update_makes_the_next_step_start_from_zero_rewards(tmp_path):
    rows = _text_rows(8, [1, 0, 0, 1, 1, 1, 0, 0])
    cfg = _config(tmp_path, max_steps=2, gradient_accumulation_steps=1, tau=1, alpha=1.0, sync_ref_model=True)
    model, ref = _models()
    trainer = TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref)
    trainer.train()
    first, second = [h for h in trainer.history if "loss" in h]
    assert abs(first["rewards/chosen"]) > 1e-3 and first["kl"] > 0.1  # the initial reference differs
    # after the hard update the reference IS the policy: every log-ratio and the KL estimate are exactly 0, so
    # each row's loss is w·(1 − σ(0)) = w/2
    assert second["rewards/chosen"] == second["rewards/rejected"] == second["kl"] == 0.0
    labels = [r["label"] for r in rows]
    idx = TRKTOTrainer._step_indices(trainer, 1)[0]
    expected = sum((1.3 if labels[i] else 0.7) * 0.5 for i in idx) / len(idx)
    assert second["loss"] == pytest.approx(expected, rel=1e-6)


def test_cli_trains_tr_kto_on_unpaired_rows(tmp_path, capsys):
    import json

    from fasttrdpo import cli

    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _text_rows(20, [1, 0, 0, 1, 1] * 4)))
    out = tmp_path / "run"
    rc = cli.main(["train", "--trainer", "kto", "--model", "tiny", "--data", str(data), "--eval-size", "4",
                   "--max-steps", "4", "--per-device-train-batch-size", "4", "--tau", "2", "--alpha", "0.5",
                   "--desirable-weight", "1.5", "--logging-steps", "2", "--save-steps", "0", "--no-plot",
                   "--output-dir", str(out), "--disable-tqdm"])
    assert rc == 0
    assert "held-out KTO loss" in capsys.readouterr().out
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["ref_updates"] for r in train] == [1, 2]
    assert all(set(KEYS) <= set(r) for r in train)
    final = json.load(open(out / "final_metrics.json"))
    assert final["eval_rows"] == 4 and final["eval_kl/ref"] > 0
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=False)
    assert state["config"]["trainer"] == "kto" and state["config"]["desirable_weight"] == 1.5

    # `fasttrdpo eval` of the checkpoint: TR-KTO as recorded (unpaired rows, the run's held-out last 4 rows, the KTO
    # loss with desirable_weight 1.5, KL rows paired in blocks of the recorded batch 4) = the run's own final
    # TRKTOTrainer.evaluate() on the same weights. (Before: the DPO loss on pairs, which these rows are not.)
    ckpt = str(out / "checkpoint-4")
    assert cli.main(["eval", "--model", ckpt, "--output", str(tmp_path / "e.json")]) == 0
    ev = json.load(open(tmp_path / "e.json"))
    assert (ev["trainer"], ev["desirable_weight"], ev["per_device_train_batch_size"]) == ("kto", 1.5, 4)
    assert (ev["step"], ev["ref_updates"], ev["eval_rows"]) == (4, 2, 4)
    assert "eval_rewards/accuracies" not in ev and "eval_pairs" not in ev
    # same weights, rows and code path; the CLI loads the model through from_pretrained: fp32 round-off at most
    for key in ["eval_loss", "eval_kl/ref"] + [f"eval_{k}" for k in KEYS]:
        assert ev[key] == pytest.approx(final[key], rel=1e-6, abs=1e-7), key
    # a flag overrides the recorded weight: the same numbers as TRKTOTrainer.evaluate() in process with it
    assert cli.main(["eval", "--model", ckpt, "--desirable-weight", "3.0", "--output", str(tmp_path / "e3.json")]) == 0
    ev3 = json.load(open(tmp_path / "e3.json"))
    from transformers import AutoModelForCausalLM

    rows = _text_rows(20, [1, 0, 0, 1, 1] * 4)[16:]
    cfg = TRDPOConfig(trainer="kto", desirable_weight=3.0, per_device_train_batch_size=4,
                      output_dir=str(tmp_path / "unused"))
    direct = TRKTOTrainer(AutoModelForCausalLM.from_pretrained(ckpt), tiny_tokenizer(), None, cfg,
                          ref_model=AutoModelForCausalLM.from_pretrained(ckpt + "/reference"), eval_dataset=rows,
                          init_model=False).evaluate()
    assert ev3["eval_loss"] > ev["eval_loss"] + 1e-3  # the desirable rows' losses weigh twice as much
    for key in ["eval_loss", "eval_kl/ref"] + [f"eval_{k}" for k in KEYS]:
        assert ev3[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-7), key
    # --trainer kto evaluates any policy/reference pair as TR-KTO: the same tiny model twice gives log-ratios and z of
    # exactly 0, so each row's loss is w·(1 − σ(0)) = 0.5 with the default weights
    assert cli.main(["eval", "--model", "tiny", "--ref-model", "tiny", "--trainer", "kto", "--data", str(data),
                     "--eval-size", "4", "--output", str(tmp_path / "t.json")]) == 0
    plain = json.load(open(tmp_path / "t.json"))
    assert (plain["trainer"], plain["eval_rows"], plain["eval_loss"], plain["eval_kl"]) == ("kto", 4, 0.5, 0.0)
    # the KL-row block size only means something for KTO: refused for a DPO evaluation
    assert cli.main(["eval", "--model", "tiny", "--ref-model", "tiny", "--per-device-train-batch-size", "2"]) == 2
    assert "--trainer kto" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_kto_loss_matches_a_float64_reference(backend):
    """KTOLoss from hidden states against float64 log-softmax sums and TRL's KTO formula: loss, metrics and the
    gradients in hidden, weight and bias (z detached). Rows: 2 desirable, 1 undesirable, 1 with a fully ignored
    completion; the KL rows have their own labels."""
    from fasttrdpo.loss import KTOLoss

    g = torch.Generator().manual_seed(0)
    R, T, H, V = 4, 6, 8, 37
    hidden = torch.randn(R, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    # a sharper reference: on random labels its log-probs are lower, so z > 0 and the KL term enters
    ref_hidden, ref_weight = torch.randn(R, T, H, generator=g), torch.randn(V, H, generator=g) * 1.5
    kl_hidden, kl_ref_hidden = torch.randn(R, T, H, generator=g), torch.randn(R, T, H, generator=g)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[:, :2] = -100
    labels[3] = -100
    kl_labels = torch.randint(0, V, (R, T), generator=g)
    kl_labels[:, :3] = -100
    desirable = torch.tensor([True, False, True, True])
    beta, wd, wu = 0.3, 1.3, 0.7

    fn = KTOLoss(beta=beta, desirable_weight=wd, undesirable_weight=wu, backend=backend, token_stats=True)
    pol_kl, ref_kl = fn.kl_logps(kl_hidden, weight, kl_labels, kl_ref_hidden, ref_weight, policy_bias=bias)
    loss, metrics = fn(hidden, weight, labels, ref_hidden, ref_weight, desirable, pol_kl, ref_kl, policy_bias=bias)
    loss.backward()

    def seq64(h, w, b, lab):
        logp = torch.log_softmax(h.double() @ w.double().T + (0 if b is None else b.double()), -1)
        tok = logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(lab != -100, tok, 0.0).sum(1)

    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    z = (seq64(kl_hidden, w64, b64, kl_labels) - seq64(kl_ref_hidden, ref_weight, None, kl_labels)).mean()
    z = z.clamp(min=0).detach()
    r = seq64(h64, w64, b64, labels) - seq64(ref_hidden, ref_weight, None, labels)
    ref_loss = torch.where(desirable, wd * (1 - torch.sigmoid(beta * (r - z))),
                           wu * (1 - torch.sigmoid(beta * (z - r)))).mean()
    ref_loss.backward()
    assert float(z) > 0  # the KL term is active
    # Tolerances: fp32 rounding bounds (unit roundoff u = 2^-24) computed from this data, worst case (γ_n ≈ n·u).
    # A token's log-prob is logit_y − logsumexp(logits): each logit is an H-term dot product plus a bias, off by
    # ≤ (H+1)·u·A with A = max_v Σ_i |h_i·w_vi| + |b_v|; logit_y and the logsumexp shift by that each (2·(H+1)·u·A),
    # the V-term sum of exps adds ≤ (V+2)·u to its log, and the final subtraction u·|log-prob|. A row's sum over
    # its n tokens adds n·u·|sum|.
    u = 2.0 ** -24

    def seq_err(h, w, b, lab):
        h, w, b = h.detach().double(), w.detach().double(), None if b is None else b.detach().double()
        A = h.abs() @ w.abs().T + (0 if b is None else b.abs())
        tok = 2 * (H + 1) * u * A.amax(-1) + (V + 2) * u + u * torch.log_softmax(h @ w.T + (0 if b is None else b),
                                                                                  -1).abs().amax(-1)
        n = (lab != -100).sum(1)
        return torch.where(lab != -100, tok, 0.0).sum(1) + n * u * seq64(h, w, b, lab).abs()

    e_r = seq_err(hidden, weight, bias, labels) + seq_err(ref_hidden, ref_weight, None, labels)  # r = π − π_ref
    e_kl = seq_err(kl_hidden, weight, bias, kl_labels) + seq_err(kl_ref_hidden, ref_weight, None, kl_labels)
    e_z = float(e_kl.max())  # z is a mean of the KL rows' differences; clamp(min=0) is 1-Lipschitz
    # the loss is a mean of w·σ(±β·(r − z)), slope ≤ w·β/4, plus a few roundings of a value ≤ max(w)
    e_loss = max(wd, wu) * beta / 4 * (float(e_r.max()) + e_z) + 4 * u * max(wd, wu)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=e_loss)
    torch.testing.assert_close(metrics["kl"].double(), z, rtol=0, atol=e_z)
    rewards = beta * r.detach()
    # rewards = β·r, averaged over a class (a mean of values each within β·e_r, plus its own 2 roundings)
    for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
        e = beta * float(e_r[sel].max()) + 2 * u * float(rewards[sel].abs().max())
        torch.testing.assert_close(metrics[f"rewards/{name}"].double(), rewards[sel].mean(), rtol=0, atol=e)
    mean_logit = (h64.detach() @ w64.detach().T + b64.detach()).mean(-1)
    mask = labels != -100
    chosen_tok = mask & desirable[:, None]
    # mean logit = h·mean_v(W) + mean(b): mean over V rows (V·u relative of max|w|), an H-term dot product ((H+1)·u
    # of Σ|h|·|mean w|), then a mean over the class's tokens (n·u)
    A_mean = float((h64.detach().abs() @ w64.detach().abs().T + b64.detach().abs()).amax())
    e_logit = (V + H + 2 + int(chosen_tok.sum())) * u * A_mean
    torch.testing.assert_close(metrics["logits/chosen"].double(), mean_logit[chosen_tok].mean(), rtol=0, atol=e_logit)
    # TRL's entropy: mean over every row's completion tokens of −Σ p log p (fp32 per token, ≤ log V ≈ 3.6, over 12
    # tokens: ~1e-6 absolute)
    logp64 = torch.log_softmax(h64.detach() @ w64.detach().T + b64.detach(), -1)
    ent64 = -(logp64.exp() * logp64).sum(-1)
    torch.testing.assert_close(metrics["entropy"].double(), ent64[mask].mean(), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="token_stats"):
        KTOLoss(token_stats=1)
    # gradients: d loss/d logit_v = c·(p_v − [v = y]) with |c| ≤ max(w)·β/4 / R; p_v carries the log-prob's error
    # (relative e_tok ≤ max row error), c the error of σ' at β·(r − z) (≤ β/4·β·(e_r + e_z) relative, tiny); the
    # back-products through W (H or V terms) add (V+H)·u of their magnitude. Bound per entry:
    c = max(wd, wu) * beta / 4 / R
    e_p = float(e_r.max()) + e_z
    for got, want, scale in ((hidden.grad, h64.grad, float(w64.detach().abs().max())),
                             (weight.grad, w64.grad, float(h64.detach().abs().max()) * T),
                             (bias.grad, b64.grad, float(T))):
        e = 2 * c * scale * (e_p + (V + H + 2) * u)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=e)
    assert float(hidden.grad[3].abs().sum()) == 0.0  # a row with no completion token gets no gradient
    # a batch without undesirable rows: TRL appends no rejected metrics (NaN here), the loss is still defined
    _, only = fn(hidden, weight, labels, ref_hidden, ref_weight, torch.ones(R, dtype=torch.bool), pol_kl, ref_kl,
                 policy_bias=bias)
    assert torch.isnan(only["rewards/rejected"]) and torch.isnan(only["rewards/margins"])
    assert not torch.isnan(only["rewards/chosen"])


def test_two_process_ddp_runs_with_the_gathered_kl_rows(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): TR-KTO runs to the end through the ranks' all_gather of the KL rows
    (a rank that skipped it would hang the other), policy and reference are bitwise identical on both ranks, and
    the reference was updated at every step. (That the gathered z equals TRL's is not checked here.)"""
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _text_rows(16, [1, 0, 0, 1] * 4)))
    common = ["-m", "fasttrdpo", "train", "--trainer", "kto", "--model", "tiny", "--data", str(data),
              "--eval-size", "0", "--max-steps", "2", "--tau", "1", "--alpha", "0.5", "--logging-steps", "1",
              "--save-steps", "0", "--no-plot", "--disable-tqdm", "--threads", "1", "--learning-rate", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           *common, "--per-device-train-batch-size", "2", "--output-dir", str(tmp_path / "two")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    final = json.load(open(tmp_path / "two" / "final_metrics.json"))
    assert final["world_size"] == 2
    fps = final["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1]
    records = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["ref_updates"] for r in records if "loss" in r] == [1, 2]
    assert all(set(KEYS) - {"rewards/margins"} <= set(r) for r in records if "loss" in r)


def test_unbalanced_labels_get_trls_weight_advice(tmp_path, caplog):
    import logging

    rows = _text_rows(8, [1, 1, 1, 1, 1, 1, 0, 0])  # 6 desirable, 2 undesirable: TRL advises w_d in [0.33, 0.44]
    with caplog.at_level(logging.WARNING, logger="fasttrdpo"):
        TRKTOTrainer(tiny_model(seed=0, hidden_size=32), tiny_tokenizer(), rows,
                     _config(tmp_path, desirable_weight=1.0, undesirable_weight=1.0))
    assert "desirable_weight in [0.33, 0.44] OR undesirable_weight in [2.26, 3.0]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fasttrdpo"):
        TRKTOTrainer(tiny_model(seed=0, hidden_size=32), tiny_tokenizer(), rows,
                     _config(tmp_path, desirable_weight=0.4, undesirable_weight=1.0))
    assert "desirable_weight in" not in caplog.text


def test_resume_is_bit_identical(tmp_path):
    """The loop's checkpoints carry a TR-KTO run: resuming at step 2 of 4 ends with the same policy, reference and
    loss curve as the uninterrupted run (CPU, fp32)."""
    import json

    rows = _text_rows(16, [1, 0, 0, 1] * 4)

    def run(out, steps, resume=None):
        cfg = _config(tmp_path, output_dir=str(tmp_path / out), max_steps=steps, gradient_accumulation_steps=1,
                      save_steps=2, tau=2, alpha=0.5, resume_from_checkpoint=resume)
        model, ref = _models()
        trainer = TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref)
        trainer.train()
        return trainer

    whole = run("whole", 4)
    run("cut", 2)
    saved = json.load(open(tmp_path / "cut" / "checkpoint-2" / "trainer_state.json"))["num_tokens"]
    resumed = run("cut", 4, resume="latest")
    assert resumed.resumed_from and resumed.ref_updates == whole.ref_updates == 2
    assert resumed.fingerprints() == whole.fingerprints()

    def curve(out, key="loss"):
        return [json.loads(line)[key] for line in open(tmp_path / out / "metrics.jsonl")]

    assert curve("cut") == curve("whole") and len(curve("whole")) == 4
    # num_tokens continues from the checkpoint's count (saved with it), not from 0
    assert curve("cut", "num_tokens") == curve("whole", "num_tokens") and saved == curve("whole", "num_tokens")[1]
    assert resumed.num_tokens == whole.num_tokens == curve("whole", "num_tokens")[-1]
    # a checkpoint written before num_tokens was saved: the count is recomputed from the data order on resume
    state_file = tmp_path / "cut" / "checkpoint-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["num_tokens"]
    torch.save(state, state_file)
    cfg = _config(tmp_path, output_dir=str(tmp_path / "cut"), max_steps=4, gradient_accumulation_steps=1, tau=2,
                  alpha=0.5)
    model, ref = _models()
    legacy = TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref)
    legacy.load_checkpoint(str(tmp_path / "cut" / "checkpoint-2"))
    assert legacy.num_tokens == saved


def test_load_unpaired_dataset(tmp_path):
    import json

    from fasttrdpo.data import MalformedRowError
    from fasttrdpo.unpaired_data import load_unpaired_dataset

    rows = _text_rows(4, [1, 0, 1, 0])
    good = tmp_path / "kto.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_unpaired_dataset(str(good))
    assert ds.column_names == ["prompt", "completion", "label"] and ds["label"] == [True, False, True, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(dict(r, label="yes") if i == 2 else r) + "\n" for i, r in enumerate(rows)))
    with pytest.raises(MalformedRowError, match="row 2"):
        load_unpaired_dataset(str(bad))
    assert len(load_unpaired_dataset(str(bad), skip_malformed=True)) == 3
    paired = tmp_path / "pairs.jsonl"  # pairs load as pairs: the trainer unpairs them as TRL does
    paired.write_text("".join(json.dumps(r) + "\n" for r in PAIRED_ROWS))
    assert load_unpaired_dataset(str(paired)).column_names == ["prompt", "chosen", "rejected"]


_DDP_SCRIPT = r'''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_kto_trainer import _config, _models, _text_rows
from fasttrdpo.tiny import tiny_tokenizer
from fasttrdpo.trainer import TRKTOTrainer
rows = json.load(open(sys.argv[2]))
cfg = _config(__import__("pathlib").Path(sys.argv[3]), output_dir=sys.argv[3], max_steps=1,
              per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, sync_ref_model=False)
model, ref = _models()
TRKTOTrainer(model, tiny_tokenizer(), rows, cfg, ref_model=ref).train()
'''


def test_ddp_metrics_divide_global_class_sums_by_global_counts(tmp_path):
    """2 ranks (gloo), 2 micro-batches of 4 rows per rank with unequal desirable counts per rank (micro-batch 0:
    1 vs 3; micro-batch 1: 0 vs 2, so rank 0 measures no rewards/chosen there): each logged metric is TRL's, the
    mean over micro-batches of (class sum over BOTH ranks' rows / class count over both ranks), computed here in
    float64 from the same rows. Per-rank means averaged over ranks (the old reduction) are off by O(1)."""
    import json
    import os
    import subprocess
    import sys

    n, B, W, A = 16, 4, 2, 2
    probe = SimpleNamespace(config=SimpleNamespace(seed=0, data_seed=None, train_sampling_strategy="auto",
                                                   per_device_train_batch_size=B,
                                                   gradient_accumulation_steps=A),
                            steps_per_epoch=1, train_pairs=range(n), global_batch_size=B * A * W, world_size=W)
    probe._step_rows = lambda step: TRKTOTrainer._step_rows(probe, step)
    where = {}  # (micro-batch, rank) -> row indices, from the trainer's own step -> rows map
    for r in range(W):
        probe.rank = r
        for a, idx in enumerate(TRKTOTrainer._step_indices(probe, 0)):
            where[a, r] = idx
    desirable_per = {(0, 0): 1, (0, 1): 3, (1, 0): 0, (1, 1): 2}
    rows = _text_rows(n, [0] * n)
    for key, idx in where.items():
        for j, i in enumerate(idx):
            rows[i]["label"] = j < desirable_per[key]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(script), os.path.dirname(__file__), str(tmp_path / "rows.json"), str(tmp_path / "out")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    logged = next(json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl") if "loss" in json.loads(line))

    # float64 reference on the initial weights (both micro-batches precede the only optimizer step)
    model, ref = _models()
    model, ref = model.double().eval(), ref.double().eval()
    tok = tiny_tokenizer()
    cfg = _config(tmp_path)
    examples = tokenize_unpaired_dataset(rows, tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                         truncation_mode=cfg.truncation_mode)
    collate = UnpairedCollator(tok.pad_token_id, cfg.max_length)
    per_mb = {k: [] for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                              "logits/chosen", "logits/rejected", "rewards/margins")}
    with torch.no_grad():
        for a in range(A):
            idx = where[a, 0] + where[a, 1]  # the pooled rows of micro-batch a
            batch = collate([examples[i] for i in idx], None)
            mask = batch["labels"] != collate.ignore_index
            lab = batch["labels"].clamp(min=0).unsqueeze(-1)

            def seq(m):
                logits = m(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return (logits.log_softmax(-1).gather(-1, lab).squeeze(-1) * mask).sum(1), logits
            lp, logits = seq(model)
            rlp, _ = seq(ref)
            rewards = 0.1 * (lp - rlp)
            logit_sums = (logits.mean(-1) * mask).sum(1)
            tokens = mask.sum(1).double()
            d = batch["desirable"]
            for name, sel in (("chosen", d), ("rejected", ~d)):
                if sel.any():
                    per_mb[f"rewards/{name}"].append(rewards[sel].sum() / sel.sum())
                    per_mb[f"logps/{name}"].append(lp[sel].sum() / sel.sum())
                    per_mb[f"logits/{name}"].append(logit_sums[sel].sum() / tokens[sel].sum())
            if d.any() and (~d).any():
                per_mb["rewards/margins"].append(per_mb["rewards/chosen"][-1] - per_mb["rewards/rejected"][-1])
    assert len(per_mb["rewards/chosen"]) == 2 and len(per_mb["rewards/margins"]) == 2
    # fp32 log-prob sums over <= 48 tokens x V=384 vs float64: ~1e-7 relative each (as in
    # test_same_numbers_as_trl_kto_trainer, held there to 1e-5 relative); rewards = 0.1·(π − π_ref) is a difference
    # of two such sums, so its bound is absolute: 2·0.1·1e-5·|logps|
    mag = max(abs(float(x)) for k in ("logps/chosen", "logps/rejected") for x in per_mb[k])
    for key, vals in per_mb.items():
        want = float(torch.stack(vals).mean())
        tol = 2 * 2 * 0.1 * 1e-5 * mag if key.startswith("rewards") else 1e-5 * abs(want) + 1e-6
        assert abs(logged[key] - want) <= tol, (key, logged[key], want, tol)


def test_train_sampling_strategy_is_checked(tmp_path):
    with pytest.raises(ValueError, match="train_sampling_strategy='sequential' applies to trainer='kto' only"):
        TRDPOConfig(trainer="dpo", train_sampling_strategy="sequential")
    with pytest.raises(ValueError, match="train_sampling_strategy must be"):
        _config(tmp_path, train_sampling_strategy="group_by_length")
    # random: the loop's seeded per-epoch permutation (not the dataset order)
    assert _our_order(_config(tmp_path, train_sampling_strategy="random"), STEPS * B * ACCUM) != list(
        range(STEPS * B * ACCUM))
