"""Padding-free packing and shared prompts (fasttrdpo.training.packing) give the padded batch's numbers.

Tolerance (fp32). The packed and the padded forwards run the same model on the same tokens with the same
position ids and the same visible keys; only the batch shape differs, so the kernels' reduction orders
and tilings differ: each hidden state differs by rounding only. Per token the log-prob is
z_y - lse(z), so that rounding reaches it scaled by the magnitude of its terms; per row we allow
    |packed - padded| <= κ·u·Σ_t (|lse_t| + max_v |z_t|),   u = 2^-24, κ = 2^8
(`probe_tolerance(torch.float32)`, 1.5e-5 relative; measured <= 5e-8, i.e. <= 1 u). A row that leaked
attention across rows, saw the wrong positions, or lost/duplicated a label is off by O(1) of that scale
(a GPT-NeoX fed wrong position ids: 4.5e-5 relative on random weights; trained weights: far more).
The loss: |∂loss/∂logp| <= β per row (sigmoid), 4 rows per pair -> |Δloss| <= 4β·max row bound.
"""
import copy
import logging

import pytest
import torch
import transformers as T

from fasttrdpo.data import PreferenceCollator, TokenizedPair, synthetic_preference_dataset, tokenize_dataset
from fasttrdpo.tiny import tiny_model, tiny_tokenizer
from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer
from fasttrdpo.training.packing import (PackingRefused, build_packed_batch, count_backbone_tokens, plan_packing,
                                        probe_tolerance)

V = 384  # ByT5's vocabulary
KAPPA_U = probe_tolerance(torch.float32)

# prompts longer than the completions, and shorter; a one-character prompt
ROWS = [
    {"prompt": "Human: tell me all about the weather in the mountains today. Assistant:", "chosen": " Sunny.",
     "rejected": " Rain, sadly."},
    {"prompt": "Q:", "chosen": " a much longer answer that goes on for a while", "rejected": " short one"},
    {"prompt": "Write a haiku about packing bins", "chosen": " rows fold in tight", "rejected": " no"},
    {"prompt": "x", "chosen": " yes indeed, quite so", "rejected": " nope, not at all, never"},
]

FAMILIES = {  # tied and untied heads; rotary (NeoX partial, Llama, Qwen2) and absolute positions (GPT-2)
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        rotary_pct=0.25, tie_word_embeddings=False, max_position_embeddings=256)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, tie_word_embeddings=True, max_position_embeddings=256)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, tie_word_embeddings=False, max_position_embeddings=256)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                                   bos_token_id=1, eos_token_id=1)),
}


def _model(family, seed):
    torch.manual_seed(seed)
    m = FAMILIES[family]()
    m.config._attn_implementation = "sdpa"
    return m


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_steps=0, plot=False, disable_tqdm=True, tau=5, eval_kl=False, beta=0.5)
    base.update(kw)
    return TRDPOConfig(**base)


def _row_logps(backbone, head, batch, index, labels, row_ids, n_rows):
    """Summed log-probs per row from the hidden states at `index` (float64 head), and Σ(|lse| + max|z|)."""
    with torch.no_grad():
        h = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    h = h.reshape(-1, h.shape[-1])[index].double()
    z = h @ head.weight.double().T + (0 if head.bias is None else head.bias.double())
    lp = z.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    mag = z.logsumexp(-1).abs() + z.abs().amax(-1)
    zeros = torch.zeros(n_rows, dtype=torch.float64)
    return zeros.index_add(0, row_ids, lp), zeros.index_add(0, row_ids, mag)


def _padded_tokens(batch):
    labels = batch["labels"]
    valid = labels.reshape(-1) != -100
    rows = torch.arange(labels.shape[0])[:, None].expand_as(labels).reshape(-1)[valid]
    return torch.arange(labels.numel())[valid], labels.reshape(-1)[valid], rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_and_shared_logps_equal_the_padded_batch(tmp_path, family):
    policy, ref = _model(family, 0), _model(family, 1)
    tok = tiny_tokenizer()
    trainer = TRDPOTrainer(policy, tok, ROWS, _config(tmp_path, share_prompt=True), ref_model=ref)
    pairs = trainer.train_pairs
    assert any(len(p.prompt) > max(len(p.chosen), len(p.rejected)) for p in pairs)
    assert any(len(p.prompt) < min(len(p.chosen), len(p.rejected)) for p in pairs)
    padded = trainer._batch(pairs)
    n = 2 * len(pairs)
    for share in (False, True):
        plan = plan_packing(pairs, trainer.config.max_length // 4, share_prompt=share)  # several units a bin
        assert plan.share_prompt == share and plan.unshared_pairs == 0
        assert len(plan.bins) < (len(pairs) if share else 2 * len(pairs))  # units share bins: a leak would show
        packed = build_packed_batch(pairs, plan, pad_token_id=tok.pad_token_id)
        for model in (trainer.model, trainer.ref_model):
            backbone, head = model.base_model, model.get_output_embeddings()
            want, mag = _row_logps(backbone, head, padded, *_padded_tokens(padded), n)
            got, _ = _row_logps(backbone, head, packed, packed["token_index"], packed["labels"], packed["row_ids"], n)
            err = (got - want).abs()
            assert bool((err <= KAPPA_U * mag).all()), (family, share, err.tolist(), (KAPPA_U * mag).tolist())
    # the trainer's loss and metrics on its shared-prompt batch (token-list loss) equal the padded ones
    packed = trainer._batch(pairs, packed=True)
    rows_tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    assert packed["plan"].share_prompt and packed["plan"].tokens < rows_tokens < padded["input_ids"].numel()
    trainer.model.eval()
    with torch.no_grad():
        loss_p, m_p = trainer._loss(padded, trainer.policy)
        loss_k, m_k = trainer._loss(packed, trainer.policy)
    bound = 4 * 0.5 * float((KAPPA_U * mag).max())
    assert abs(float(loss_k) - float(loss_p)) <= bound
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m_k[k]) - float(m_p[k])) <= bound, k


def test_twenty_fp32_steps_give_the_padded_loss_curve(tmp_path):
    """Same training (reference update every 5 steps), three layouts."""
    data = synthetic_preference_dataset(96, seed=3)
    curves = {}
    # the same 4 pairs a step; packed splits them into 2 micro-batches (accumulation averages per pair, as TRL)
    runs = {"padded": dict(per_device_train_batch_size=4), "shared": dict(share_prompt=True, per_device_train_batch_size=4),
            "packed": dict(packing=True, per_device_train_batch_size=2, gradient_accumulation_steps=2)}
    for name, kw in runs.items():
        small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        trainer = TRDPOTrainer(tiny_model(0, **small), tiny_tokenizer(), data,
                               _config(tmp_path / name, max_steps=20, beta=0.1, max_length=32, **kw),
                               ref_model=tiny_model(1, **small))
        trainer.train()
        curves[name] = [(r["loss"], r["rewards/margins"], r["ref_updates"]) for r in trainer.history if "loss" in r]
        assert len(curves[name]) == 20
    # Step 1's arithmetic differs by rounding (<= κu relative per row); 20 Adam steps (lr 1e-3) carry it on
    # without amplifying it past a few times: measured max |Δloss| 3e-7. Bound: 1e-5 on a loss ~0.69 (the
    # step-1 bound 4β·κu·Σ ~ 1e-6 times 10 for the 20 steps); a wrong label or leak shows at 1e-2.
    for name in ("packed", "shared"):
        for (lp, mp, rp), (lk, mk, rk) in zip(curves["padded"], curves[name]):
            assert rk == rp
            assert abs(lk - lp) <= 1e-5, (name, curves["padded"], curves[name])
            assert abs(mk - mp) <= 1e-5, name
    losses = [c[0] for c in curves["padded"]]
    assert max(losses) - min(losses) > 1e-3  # the policy really moved: the curves are not trivially equal
    print({name: max(abs(a[0] - b[0]) for a, b in zip(curves["padded"], curves[name])) for name in ("packed", "shared")})


def test_probe_refuses_models_that_do_not_take_the_mask(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    mpt = T.MptForCausalLM(T.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4))
    # ALiBi: plain packing is exact (the bias is shift-invariant), shared prompts are not (distances)
    TRDPOTrainer(copy.deepcopy(mpt), tok, ROWS, _config(tmp_path, packing=True))
    with pytest.raises(PackingRefused, match="model_type 'mpt'.*shared-prompt"):
        TRDPOTrainer(mpt, tok, ROWS, _config(tmp_path, share_prompt=True))
    bloom = T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(PackingRefused, match="model_type 'bloom'"):
        TRDPOTrainer(bloom, tok, ROWS, _config(tmp_path, packing=True))
    # flash-attention (varlen) cannot take the shared-prompt mask: refused with what to do instead
    m = tiny_model(0)
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        TRDPOTrainer(m, tok, ROWS, _config(tmp_path, share_prompt=True))


def test_truncated_pairs_keep_the_padded_tokens_and_are_counted(tmp_path, caplog):
    """A pair over max_length is cut once, by tokenize_dataset, for every layout: the packed rows hold
    exactly the padded rows' tokens; a shared unit over max_length goes as its two rows."""
    tok = tiny_tokenizer()
    rows = ROWS + [{"prompt": "P" * 100, "chosen": " " + "c" * 40, "rejected": " " + "r" * 30}]
    with caplog.at_level(logging.INFO, logger="fasttrdpo"):
        pairs = tokenize_dataset(__import__("datasets").Dataset.from_list(rows), tok, max_length=96)
    assert "truncated 1 of 5 pairs to max_length=96" in caplog.text
    assert max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs) == 96
    padded = PreferenceCollator(tok.pad_token_id)(pairs)
    _, want_labels, want_rows = _padded_tokens(padded)
    for share in (False, True):
        plan = plan_packing(pairs, 96, share_prompt=share)
        assert all(length <= 96 for length in plan.bin_lengths)
        assert plan.unshared_pairs == (1 if share else 0)
        packed = build_packed_batch(pairs, plan, pad_token_id=tok.pad_token_id)
        for r in range(2 * len(pairs)):  # the same label tokens per row, in the same order
            assert packed["labels"][packed["row_ids"] == r].tolist() == want_labels[want_rows == r].tolist()
    with pytest.raises(ValueError, match="pairs\\[0\\].*> max_length=10"):
        plan_packing(pairs, 10)


def test_plan_and_token_counts():
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in ((10, 3, 4), (2, 8, 6), (5, 5, 5), (1, 2, 9))]
    plan = plan_packing(pairs, 20)
    seen = sorted((u.pair, u.kind) for b in plan.bins for u in b)
    assert seen == sorted((i, k) for i in range(4) for k in ("chosen", "rejected"))
    assert plan.bin_lengths and max(plan.bin_lengths) <= 20
    for b in plan.bins:  # units back to back from 0
        assert [u.start for u in b] == [sum(x.length for x in b[:k]) for k in range(len(b))]
    rows = sum(2 * p + c + r for p, c, r in ((10, 3, 4), (2, 8, 6), (5, 5, 5), (1, 2, 9)))
    counts = count_backbone_tokens([pairs[:2], pairs[2:]], 20)
    assert counts.packed == rows == plan.tokens
    assert counts.padded == 2 * 2 * 14 + 2 * 2 * 10  # longest rows: 2+8+... = 14 and 1+9 = 10
    assert counts.shared == sum(p + c + r for p, c, r in ((10, 3, 4), (2, 8, 6), (5, 5, 5), (1, 2, 9)))
    assert counts.packed_computed >= counts.packed and counts.shared_computed >= counts.shared


def test_plan_balances_bins_when_that_narrows_the_widest():
    """Rows 6, 5 | 4, 3 | 2, 2 at max_length 10: first fit decreasing needs 3 bins (6+4, 5+3+2, 2: widest
    10, 30 positions in the mask layout); longest first into the least-filled of 3 bins gives 6+2, 5+2, 4+3
    (widest 8, 24 positions). When balancing would exceed max_length (so not narrow the widest bin), first
    fit's bins stay."""
    pairs = [TokenizedPair([1], [2] * c, [3] * r) for c, r in ((5, 4), (3, 2), (1, 1))]
    plan = plan_packing(pairs, 10)
    assert sorted(plan.bin_lengths) == [7, 7, 8] and plan.width == 8 and plan.computed_tokens == 24
    assert [[(u.pair, u.kind, u.start) for u in b] for b in plan.bins] == [
        [(0, "chosen", 0), (2, "rejected", 6)], [(0, "rejected", 0), (2, "chosen", 5)],
        [(1, "chosen", 0), (1, "rejected", 4)]]
    # rows 2, 2 | 2, 3 | 3, 5 at max_length 6: first fit 5 | 3+3 | 2+2+2; balancing would put the last 2 beside
    # the 5 (7 > 6): first fit's bins stay
    pairs = [TokenizedPair([1], [2] * c, [3] * r) for c, r in ((1, 1), (1, 2), (2, 4))]
    plan = plan_packing(pairs, 6)
    assert plan.bin_lengths == [5, 6, 6]
    assert [[(u.pair, u.kind) for u in b] for b in plan.bins] == [
        [(2, "rejected")], [(1, "rejected"), (2, "chosen")], [(0, "chosen"), (0, "rejected"), (1, "chosen")]]
