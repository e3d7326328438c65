"""TRDPOTrainer itself against TRL 1.16's DPOTrainer over training steps with reference syncs (TR-DPO).

Same tiny GPTNeoX policy and reference (different seeds: a sync moves the reference a lot), the same plain-text
pairs through each trainer's own tokenization (TRL's rules: EOS appended, keep_start truncation), the same rows in
the same order (TRDPOTrainer's step order; TRL walks them with train_sampling_strategy="sequential"), the same
AdamW, beta, constant lr and clipping, and TRL's sync_ref_model (ref_model_sync_steps=2,
ref_model_mixup_alpha=0.6) against tau=2, alpha=0.6: 4 optimizer steps, syncs after steps 2 and 4.

How the per-step metrics are compared. Both trainers are recorded before every optimizer step (the batch and the
weights they are about to use); the metrics are then recomputed from those weights in float64 *after the backbone*
(the backbone runs as the trainers run it: fp32, or under the same bf16 autocast; it is the same module code on the
same padded batch in both trainers, so it gives the same hidden states), and

    |ours_k - TRL_k| <= head_err(ours, k) + |f64(our weights_k) - f64(TRL's weights_k)| + head_err(TRL, k)

where head_err is a worst-case bound on a trainer's head arithmetic against float64, derived per token from the
hidden states (`head_error_bounds`), and the middle term ("drift") is computed exactly. Every metric is recomputed
on OUR batch of step k, so TRL having seen other rows at step k fails. At step 1 the weights are equal: drift = 0.
The drift measures how far the trajectories have separated, which the tests bound separately: fp32, below the
rounding yardstick head_err (the runs differ by rounding only); bf16, through Adam's worst-case step on the weights.

The reference syncs are checked element by element across the runs (`_assert_same_blends`), the policies against
Adam's worst case.

Deliberate errors, checked by hand against these tests (TRDPOTrainer run with the error, TRL as here):
alpha 0.5 instead of 0.6 -> the blend check fails by 2e5x its bound (fp32 and bf16; 51x with a bf16-stored
reference), fp32 rewards at step 4 by 161x; the first sync missed (tau 4) or a sync at step 3 -> blend check 1e6x
(253x bf16-stored), fp32 rewards at step 3 280x; steps 2 and 3 of data exchanged -> num_tokens differ, and logps
by 1e4x (fp32) / 42x (bf16) their bound.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fasttrdpo.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer  # noqa: E402

STEPS, BATCH, TAU, ALPHA, BETA, MAX_LENGTH = 4, 2, 2, 0.6, 0.1, 64
ADAM_BETAS = (0.9, 0.999)  # both trainers' defaults
MODEL = dict(hidden_size=32, num_hidden_layers=2)
WORDS = ["cat", "dog", "tree", "blue", "sun", "rain", "sky", "red", "stone", "river"]
CONTINUOUS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected", "entropy")
DISCRETE = ("rewards/accuracies", "mean_token_accuracy")
U32, U_BF16 = 2.0 ** -24, 2.0 ** -8  # unit roundoffs
_TEMPLATES: dict = {}  # per dtype, one model object the recorded weights are loaded into


def _rows(n=STEPS * BATCH):
    """Plain-text pairs of different lengths (a padding or prompt miscount shows in num_tokens and logps)."""
    g = torch.Generator().manual_seed(0)
    pick = lambda k: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))  # noqa: E731
    return [{"prompt": f"Q: {pick(1 + i % 3)}?", "chosen": f" {pick(2 + i % 2)}.", "rejected": f" {pick(3 - i % 2)}!"}
            for i in range(n)]


def _models():
    return tiny_model(seed=0, **MODEL), tiny_model(seed=1, **MODEL)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_ours(tmp_path, *, bf16, lr, alpha=ALPHA, tau=TAU, order=None, ref_dtype=None):
    """TRDPOTrainer. Returns (trainer, per-step records, [(batch, policy state, ref state)] before each step, the
    rows in the order it walked them). `order`: walk these row indices instead (only to check by hand that a
    deliberate error fails the comparison)."""
    cfg = TRDPOConfig(output_dir=str(tmp_path / "ours"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                      learning_rate=lr, lr_scheduler_type="constant", beta=BETA, alpha=alpha, tau=tau,
                      max_length=MAX_LENGTH, truncation_mode="keep_start", bf16=bf16, logging_steps=1, save_steps=0,
                      plot=False, disable_tqdm=True, ref_dtype=ref_dtype)
    assert not cfg.gradient_checkpointing  # fasttrdpo's default (TRL's is True): the values do not depend on it
    policy, ref = _models()
    rows = _rows()
    trainer = TRDPOTrainer(policy, tiny_tokenizer(), rows, cfg, ref_model=ref)
    walked = [i for s in range(STEPS) for i in trainer._step_rows(s)]
    if order is not None:
        trainer._step_rows = lambda step: order[step * BATCH:(step + 1) * BATCH]
    seen, loss = [], trainer._loss

    def recording_loss(batch, policy_module):
        seen.append((batch, _state(trainer.model), _state(trainer.ref_model)))
        return loss(batch, policy_module)

    trainer._loss = recording_loss
    trainer.train()
    return trainer, [h for h in trainer.history if "loss" in h], seen, [rows[i] for i in walked]


class _Snapshots(TrainerCallback):
    """TRL's policy and reference weights at the start of every optimizer step."""

    def __init__(self):
        self.trainer, self.states = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.states.append((_state(self.trainer.model), _state(self.trainer.ref_model)))


def run_trl(tmp_path, rows, *, lr, ref_dtype=None, **kw):
    """TRL's DPOTrainer over `rows` in their order (sequential sampler); kw: DPOConfig overrides (bf16 and
    gradient_checkpointing are left at TRL's defaults unless given). Returns (trainer, records, snapshots)."""
    args = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                learning_rate=lr, lr_scheduler_type="constant", beta=BETA, max_length=MAX_LENGTH, logging_steps=1,
                report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                train_sampling_strategy="sequential", sync_ref_model=True, ref_model_sync_steps=TAU,
                ref_model_mixup_alpha=ALPHA)
    args.update(kw)
    policy, ref = _models()
    if ref_dtype is not None:  # TRL keeps the reference in the dtype it is given
        ref = ref.to(ref_dtype)
    snapshots = _Snapshots()
    trainer = DPOTrainer(model=policy, ref_model=ref, args=DPOConfig(**args), train_dataset=Dataset.from_list(rows),
                         processing_class=tiny_tokenizer(), callbacks=[snapshots])
    snapshots.trainer = trainer
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h], snapshots.states


# --- float64 metrics after the backbone, and the head's worst-case arithmetic error ------------------------------

@torch.no_grad()
def _head64(state, batch, bf16):
    """The backbone as the trainers run it (fp32, or under bf16 autocast), then float64: logits [rows, T, V] and,
    per token, S = max_v sum_k |h_k||W_vk| (the scale of the head's rounding)."""
    dtype = state["lm_head.weight"].dtype  # a bf16-stored reference runs its backbone in bf16 storage
    if dtype not in _TEMPLATES:
        _TEMPLATES[dtype] = tiny_model(dtype=dtype, **MODEL).eval()
    model = _TEMPLATES[dtype]
    model.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    h, w = hidden.double(), model.get_output_embeddings().weight.double()
    return h @ w.T, (h.abs() @ w.abs().T).amax(-1)


def _token_stats(z, labels):
    """Per token: log-prob of the label, entropy, mean logit, label-is-argmax, and for the bounds |lse|+max|z|,
    max z - min z, and the gap between the label's logit and the best other logit."""
    lsm = torch.log_softmax(z, -1)
    lab = labels.clamp(min=0).unsqueeze(-1)
    others = z.scatter(-1, lab, -math.inf).amax(-1)
    zl = z.gather(-1, lab).squeeze(-1)
    return dict(logp=lsm.gather(-1, lab).squeeze(-1), entropy=-(lsm.exp() * lsm).sum(-1), mean_logit=z.mean(-1),
                top1=(zl > others), scale=torch.logsumexp(z, -1).abs() + z.abs().amax(-1),
                spread=z.amax(-1) - z.amin(-1), gap=(zl - others).abs())


def metrics64(policy_state, ref_state, batch, bf16):
    """TRL's DPO metrics in float64 from the weights (rows: first half chosen), and per-token data for the bounds."""
    labels = batch["labels"]
    mask = labels != -100
    P = labels.shape[0] // 2
    zp, sp = _head64(policy_state, batch, bf16)
    zr, sr = _head64(ref_state, batch, bf16)
    tp, tr = _token_stats(zp, labels), _token_stats(zr, labels)
    pl, rl = (tp["logp"] * mask).sum(1), (tr["logp"] * mask).sum(1)
    cr, rr = BETA * (pl[:P] - rl[:P]), BETA * (pl[P:] - rl[P:])
    chosen = mask.clone()
    chosen[P:] = False
    m = {"loss": float(-torch.nn.functional.logsigmoid(cr - rr).mean()), "rewards/chosen": float(cr.mean()),
         "rewards/rejected": float(rr.mean()), "rewards/margins": float((cr - rr).mean()),
         "rewards/accuracies": float((cr > rr).double().mean()), "logps/chosen": float(pl[:P].mean()),
         "logps/rejected": float(pl[P:].mean()), "logits/chosen": float(tp["mean_logit"][:P][mask[:P]].mean()),
         "logits/rejected": float(tp["mean_logit"][P:][mask[P:]].mean()), "entropy": float(tp["entropy"][mask].mean()),
         "mean_token_accuracy": float(tp["top1"][chosen].double().mean())}
    return m, dict(mask=mask, P=P, V=zp.shape[-1], H=MODEL["hidden_size"], policy=(tp, sp), ref=(tr, sr),
                   margins=(cr - rr).abs())


def head_error_bounds(data, head):
    """Worst-case |metric as a trainer's head computes it - the float64 metric on the same hidden states|.

    head "fp32": logits formed in fp32 from fp32 hidden and weight (TRDPOTrainer's eager TRDPOLoss, and TRL's fused
    head without autocast): each logit is off by at most dz = (gamma_H + 2u)·S, S = max_v sum_k |h_k||W_vk|
    (`tests/helpers.py` dot_error_bound). head "bf16": TRL's head under bf16 autocast rounds h and W to bf16
    (2u_bf16·S), writes the logit tile in bf16 (u_bf16·S) and accumulates in fp32 (with the u_bf16^2 terms, under
    0.1·u_bf16·S for H = 32): dz = 3.1·u_bf16·S (`test_trl_dpo_integration._bf16_head_bound`, here with each
    token's own S instead of a bound on it).
    A token's log-prob moves by at most 2·dz (label logit and log-sum-exp), plus the fp32 arithmetic of the
    log-softmax, u·(8·(|lse| + max|z|) + V + 4) (`tests/helpers.py` logprob_tolerance, V sequential adds);
    its entropy lse - sum_v p_v z_v moves by at most (max z - min z)·dz (dH/dz_v = -p_v (z_v - E_p z)) plus the
    same fp32 term times (1 + entropy); a mean logit by dz plus V·u·max|z| for the mean's sum. Row sums add
    their terms; rewards = beta·(policy - ref); margins add both rows; the sigmoid loss is 1-Lipschitz in
    beta·margin; a discrete metric can only change where a row's margin or a token's top-2 logit gap is within
    its error (counted)."""
    mask, P, V, H = data["mask"], data["P"], data["V"], data["H"]
    out = {}
    for role in ("policy", "ref"):
        t, S = data[role]
        dz = 3.1 * U_BF16 * S if head == "bf16" else (H * U32 / (1 - H * U32) + 2 * U32) * S
        arith = U32 * (8 * t["scale"] + V + 4)
        tok = 2 * dz + arith
        row = (tok * mask).sum(1) + U32 * mask.sum(1) * (t["logp"].abs() * mask).sum(1)  # + the row sum's adds
        out[role] = dict(dz=dz, tok=tok, row=row, arith=arith, t=t)
    pr, rr = out["policy"]["row"], out["ref"]["row"]
    reward_c, reward_r = BETA * (pr[:P] + rr[:P]), BETA * (pr[P:] + rr[P:])
    margin = reward_c + reward_r
    t, dz, arith = out["policy"]["t"], out["policy"]["dz"], out["policy"]["arith"]
    logit_tok = dz + V * U32 * (t["scale"])
    ent_tok = t["spread"] * dz + arith * (1 + t["entropy"]) + V * U32 * t["entropy"]
    chosen = mask.clone()
    chosen[P:] = False
    return {"loss": float(margin.mean()), "rewards/chosen": float(reward_c.mean()),
            "rewards/rejected": float(reward_r.mean()), "rewards/margins": float(margin.mean()),
            "logps/chosen": float(pr[:P].mean()), "logps/rejected": float(pr[P:].mean()),
            "logits/chosen": float(logit_tok[:P][mask[:P]].mean()),
            "logits/rejected": float(logit_tok[P:][mask[P:]].mean()),
            "entropy": float(ent_tok[mask].mean()),
            # a pair's accuracy can flip only if |margin| <= its error; a token's top-1 only if its gap <= 2 dz
            "rewards/accuracies": float((data["margins"] <= margin).double().mean()),
            "mean_token_accuracy": float((t["gap"][chosen] <= 2 * dz[chosen] + 2 * arith[chosen]).double().mean())}


def step_gaps(ours_logs, seen, trl_logs, trl_states, *, bf16):
    """Per step and metric: (|ours - TRL|, head_err(ours) + head_err(TRL), |f64(ours' weights) - f64(TRL's)|), all
    on our batch of that step; num_tokens must be equal."""
    assert len(ours_logs) == len(trl_logs) == len(seen) == len(trl_states) == STEPS
    out = []
    for k in range(STEPS):
        assert ours_logs[k]["num_tokens"] == trl_logs[k]["num_tokens"], k
        batch, our_policy, our_ref = seen[k]
        trl_policy, trl_ref = trl_states[k]
        out.append(_gaps(ours_logs[k], trl_logs[k], (our_policy, our_ref), (trl_policy, trl_ref), batch, bf16))
    return out


def _gaps(ours, trl, our_states, trl_states, batch, bf16):
    """ours / trl: logged records (None: compare the float64 metrics of the two weight sets only, gap = 0)."""
    ours64, our_data = metrics64(*our_states, batch, bf16)
    trl64, trl_data = metrics64(*trl_states, batch, bf16)
    err_ours = head_error_bounds(our_data, "fp32")  # TRDPOLoss: fp32 math (on CPU the hidden is fp32 after the LN)
    err_trl = head_error_bounds(trl_data, "bf16" if bf16 else "fp32")
    return {key: (0.0 if ours is None else abs(ours[key] - trl[key]), err_ours[key] + err_trl[key],
                  abs(ours64[key] - trl64[key])) for key in CONTINUOUS + DISCRETE}


def adam_step_bounds(lr, steps=STEPS, betas=ADAM_BETAS):
    """Per element, the most AdamW (weight decay 0) can move a parameter in each of `steps` steps: lr·c_t with
    c_t = max |m_hat_t| / sqrt(v_hat_t) = (1-b1)/(1-b1^t) · sqrt((1-b2^t)/(1-b2)) · sqrt(sum_{j<t} (b1^2/b2)^j)
    (Cauchy-Schwarz on the two exponential averages of the same gradients; eps only shrinks it; gradient
    clipping scales every gradient alike, which Adam's ratio ignores). c_1 = 1, c_4 = 1.002."""
    b1, b2 = betas
    return [lr * (1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2))
            * math.sqrt(sum((b1 * b1 / b2) ** j for j in range(t))) for t in range(1, steps + 1)]


def _max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _params(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_same_blends(ours, seen, trl, trl_states, *, lr):
    """The reference syncs, across the two runs, element by element. Each run's reference after a sync is
    blend(r, p) = r + alpha·(p - r) of its own reference r and policy p, up to the blend's rounding, so

        |blend_ours - blend_TRL| <= (1 - alpha)·|r_ours - r_TRL| + alpha·|p_ours - p_TRL| + e_ours + e_TRL

    with e <= 4u·(|r| + |p|) for the fp32 arithmetic (`tests/helpers.py` blend_tolerance; TRL's mul_ then add_ is
    two roundings of the same size) and, for a bf16-stored reference, the storage roundings: ours rounds the result
    once (fasttrdpo.blend_), TRL rounds r·(1 - alpha) and then the result, 1.01·u_bf16·(|result| + (1 - alpha)·|r|).
    The inputs are the recorded weights around steps 2 and 4: a wrong alpha or a sync at another step breaks it by
    ~0.1·|p - r|, far above the rounding. Between the syncs the references must not change. The policies: within
    Adam's worst case (`adam_step_bounds`: each run moves each weight by at most lr·c_t per step)."""
    final = ((_state(ours.model), _state(ours.ref_model)), (_state(trl.model), _state(trl.ref_model)))
    ours_at = [(pol, ref) for _, pol, ref in seen] + [final[0]]  # (policy, ref) before steps 1..4, and at the end
    trl_at = list(trl_states) + [final[1]]
    names = [n for n, _ in ours.ref_model.named_parameters()]  # buffers (rotary tables) are not blended
    for k in range(STEPS):  # weights before step k+1 -> before step k+2 (or the end)
        synced = (k + 1) % TAU == 0
        for name in names:
            (p_o, r_o), (p_t, r_t) = [(pol[name].double(), ref[name].double())
                                      for pol, ref in (ours_at[k + 1], trl_at[k + 1])]
            if not synced:  # the reference is untouched by an optimizer step without a sync
                assert torch.equal(ours_at[k + 1][1][name], ours_at[k][1][name]), (k + 1, name)
                assert torch.equal(trl_at[k + 1][1][name], trl_at[k][1][name]), (k + 1, name)
                continue
            r0_o, r0_t = ours_at[k][1][name].double(), trl_at[k][1][name].double()  # references before the sync
            bf16 = ours_at[k + 1][1][name].dtype == torch.bfloat16
            err = lambda r, p, res: (4 * U32 * (r.abs() + p.abs())  # noqa: E731
                                     + (1.01 * U_BF16 * (res.abs() + (1 - ALPHA) * r.abs()) if bf16 else 0.0))
            bound = ((1 - ALPHA) * (r0_o - r0_t).abs() + ALPHA * (p_o - p_t).abs()
                     + err(r0_o, p_o, r_o) + err(r0_t, p_t, r_t))
            gap = (r_o - r_t).abs()
            assert bool((gap <= bound).all()), (f"sync after step {k + 1}", name, float((gap - bound).max()))
    policy_gap, d4 = _max_gap(final[0][0], final[1][0]), 2 * sum(adam_step_bounds(lr))
    assert policy_gap <= d4, (policy_gap, d4)


LR_FP32 = 1e-3


def test_fp32_every_metric_and_both_final_models_match_trl_over_two_reference_syncs(tmp_path):
    """fp32 (DPOConfig(bf16=False, gradient_checkpointing=False)): the two trainers do the same computation in
    different summation orders (heads, AdamW fused vs foreach, blend formula). Bounds: every logged metric of every
    step within the two heads' fp32 rounding bounds (`head_error_bounds`: ~1e-3 on a row's summed log-prob, far below
    one token's log-prob, ~log 384 = 5.95; ~2e-4 on rewards); num_tokens and the sync steps equal. The trajectories
    (before every step, and the final policy and reference on every step's batch) may move the float64 metrics by
    no more than the same yardstick: this is not a worst case (Adam's normalisation can amplify the rounding of a
    near-zero gradient component) but the runs differ by rounding only, and every deliberate error tried (module
    docstring) exceeds it 50x-1e4x. The references: `_assert_same_blends`. Measured: logged gaps <= 7.6e-6 (logps),
    1.2e-6 (rewards); drift <= 3e-7; weights <= 2.2e-6 apart at lr 1e-3."""
    ours, ours_logs, seen, rows = run_ours(tmp_path, bf16=False, lr=LR_FP32)
    trl, trl_logs, trl_states = run_trl(tmp_path, rows, lr=LR_FP32, bf16=False, gradient_checkpointing=False)
    assert [h["ref_updates"] for h in ours_logs] == [0, 1, 1, 2]
    # the run is not trivial: the policy trains (the loss moves) and the syncs move the reference
    assert abs(trl_logs[-1]["loss"] - trl_logs[0]["loss"]) > 0.05
    for k, gaps in enumerate(step_gaps(ours_logs, seen, trl_logs, trl_states, bf16=False)):
        for key, (gap, bound, drift) in gaps.items():
            assert gap <= bound and drift <= bound, (f"step {k + 1}", key, gap, drift, bound)
    # the final models (after step 4 and its sync), through the same float64 metrics on every step's batch
    finals = ((_state(ours.model), _state(ours.ref_model)), (_state(trl.model), _state(trl.ref_model)))
    for batch, _, _ in seen:
        for key, (_, bound, drift) in _gaps(None, None, *finals, batch, False).items():
            assert drift <= bound, ("final", key, drift, bound)
    _assert_same_blends(ours, seen, trl, trl_states, lr=LR_FP32)


LR_BF16 = 1e-4


@pytest.mark.parametrize("ref_dtype", [None, "bfloat16"])
def test_bf16_in_trls_default_configuration(tmp_path, ref_dtype):
    """DPOConfig with bf16 and gradient_checkpointing at TRL 1.16's defaults (both on) against TRDPOConfig(bf16=True).

    What is the same: both backbones (policy and reference) run under bf16 autocast; both references stay in the
    dtype they were given (fp32 here: TRDPOConfig.ref_dtype=None keeps the reference's dtype, TRL keeps it and runs
    it under autocast) and are blended in fp32 at the same steps with the same alpha; gradient checkpointing
    recomputes the same values. What differs, by design: TRL's fused head rounds the hidden states and the lm_head
    weight to bf16 and writes its logits (and, in backward, the gradient tiles) in bf16, while TRDPOLoss does fp32
    math on the hidden states as stored (fp32 here: GPT-NeoX's residual stream stays fp32 under autocast).

    Step 1 (same weights): every metric within the two heads' derived bounds (logps ~0.2, rewards ~0.04; measured
    1.3e-3 and 3e-5). Later steps: the gradients differ at bf16 rounding, and Adam's normalised step (lr·sign(g) at
    step 1) moves the components whose gradient is within that rounding in opposite directions: the policies differ
    by 2·lr in some weights after one step (asserted) and stay within Adam's worst case 2·lr·sum c_t; each
    reference is the same blend of its run's weights (`_assert_same_blends`). Each logged metric is then within
    the head bounds plus the exact float64 difference between the two weight sets (up to 1.2e-3 on logps at lr
    1e-4). Since lr is small here, a wrong sync shows in the blend check, not in the metrics (see the module
    docstring); the fp32 test covers the optimizer trajectory.

    ref_dtype="bfloat16" (against TRL given a bf16 ref_model): the same, and the blend differs by design in its
    rounding: fasttrdpo.blend_ rounds ref + alpha·(policy - ref) once into bf16, TRL's mul_ then add_ round twice
    (22% of 1M normal weights end one bf16 ulp apart per sync), within `_assert_same_blends`' bound."""
    dtype = torch.bfloat16 if ref_dtype else torch.float32
    ours, ours_logs, seen, rows = run_ours(tmp_path, bf16=True, lr=LR_BF16, ref_dtype=ref_dtype)
    # bf16 and gradient_checkpointing: TRL's defaults
    trl, trl_logs, trl_states = run_trl(tmp_path, rows, lr=LR_BF16, ref_dtype=ref_dtype and dtype)
    assert trl.args.bf16 and trl.args.gradient_checkpointing and ours.config.bf16
    assert {p.dtype for m in (ours.ref_model, trl.ref_model) for p in m.parameters()} == {dtype}
    assert [h["ref_updates"] for h in ours_logs] == [0, 1, 1, 2]
    for k, gaps in enumerate(step_gaps(ours_logs, seen, trl_logs, trl_states, bf16=True)):
        for key, (gap, bound, drift) in gaps.items():
            if k == 0:
                assert drift == 0.0, key  # the same weights: the bound is the derived head bound alone
            assert gap <= bound + drift, (f"step {k + 1}", key, gap, bound, drift)
    # the documented separation: after one step some policy weight differs by ~2·lr (opposite Adam signs)
    assert _max_gap(seen[1][1], trl_states[1][0]) > LR_BF16
    _assert_same_blends(ours, seen, trl, trl_states, lr=LR_BF16)
