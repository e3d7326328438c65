"""The DPO loss family of TRL 1.16 (every `DPOConfig.loss_type`, weighted lists) in fasttrdpo.loss.preference_loss.

Two kinds of evidence:
1. float64 references written here from the formulas in TRL 1.16's `DPOTrainer._compute_loss` (read as text,
   not imported), compared with preference_loss on float64 inputs. The only difference is rounding order, so
   relative error ≤ 1e-9 (≈ 10⁷ ulps of float64) admits rounding and nothing else: a sign, a missing term, a
   wrong length or a sort over the wrong quantity is O(1).
2. TRL's own DPOTrainer end to end (tests/test_trl_dpo_integration.py's set-up, 3 steps, fp32) against
   FusedDPOTrainer for a subset covering each code path (see test_same_trajectory_as_trl).
"""
import math
import zlib

import pytest
import torch

import fasttrdpo.loss as L
from fasttrdpo.loss.preference import check_loss_config

RTOL = 1e-9


def _ls(x):  # log σ(x) in float64 without overflow
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def _sig(x):
    return torch.exp(_ls(x))


def ref_loss64(t, pc, pr, rc, rr, beta, eps=0.0, len_c=None, len_r=None, tau=0.05):
    """TRL 1.16's per-sequence loss for loss type t, float64 (reverse-KL scores, no ld_alpha, no WPO)."""
    pc, pr, rc, rr = (v.double() for v in (pc, pr, rc, rr))
    c, r = pc - rc, pr - rr
    x = beta * (c - r)
    if t == "sigmoid":  # TRL ignores ε here; fasttrdpo's ε > 0 is conservative DPO (DESIGN §4)
        return -(1 - eps) * _ls(x) - eps * _ls(-x)
    if t == "hinge":
        return torch.clamp(1 - x, min=0.0)
    if t in ("ipo", "sigmoid_norm"):
        d = c / len_c.double().clamp(min=1) - r / len_r.double().clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2 if t == "ipo" else -_ls(beta * d)
    if t == "exo_pair":
        return _sig(x) * (_ls(x) - math.log(1 - eps)) + _sig(-x) * (_ls(-x) - math.log(eps))
    if t == "nca_pair":
        return -_ls(beta * c) - 0.5 * _ls(-beta * c) - 0.5 * _ls(-beta * r)
    if t == "robust":
        return (-(1 - eps) * _ls(x) + eps * _ls(-x)) / (1 - 2 * eps)
    if t == "bco_pair":
        return -_ls(beta * c) - _ls(-beta * r)
    if t == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if t == "aot":
        d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return -_ls(beta * d) * (1 - eps) - _ls(-beta * d) * eps
    if t == "aot_unpaired":
        d = torch.sort(c).values - torch.sort(r).values
        return -_ls(beta * d) * (1 - eps) - _ls(-beta * d) * eps
    if t == "apo_zero":
        return (1 - _sig(beta * c)) + _sig(beta * r)
    if t == "apo_down":
        return _sig(beta * c) + (1 - _sig(beta * (c - r)))
    if t == "discopop":
        m = _sig(x / tau)
        return -_ls(x) * (1 - m) + torch.exp(-x) * m
    if t == "sft":  # −mean of every chosen token's log-prob = −Σ π_c / Σ n_c, repeated per pair
        return (-pc.sum() / len_c.double().sum()).expand(pc.shape)
    raise ValueError(t)


def _inputs(B, seed, scale=30.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    pc = -scale * torch.rand(B, generator=g, dtype=torch.float64) * 10
    pr = -scale * torch.rand(B, generator=g, dtype=torch.float64) * 10
    rc = pc + torch.randn(B, generator=g, dtype=torch.float64) * scale / 3
    rr = pr + torch.randn(B, generator=g, dtype=torch.float64) * scale / 3
    len_c = torch.randint(1, 300, (B,), generator=g)
    len_r = torch.randint(1, 300, (B,), generator=g)
    if requires_grad:
        pc.requires_grad_(True)
        pr.requires_grad_(True)
    return pc, pr, rc, rr, len_c, len_r


TRL_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
EPS = {"exo_pair": [1e-3, 0.2], "robust": [0.0, 0.2], "aot": [0.0, 0.1], "aot_unpaired": [0.0, 0.3],
       "sigmoid": [0.0, 0.1]}
CASES = [(t, e) for t in TRL_TYPES for e in EPS.get(t, [0.0])]


def test_loss_types_are_trls():
    # the names as TRL 1.16 lists them in DPOConfig's help (read from the installed package's text)
    trl = pytest.importorskip("trl")
    import dataclasses
    help_text = next(f for f in dataclasses.fields(trl.DPOConfig) if f.name == "loss_type").metadata["help"]
    names = tuple(s.strip("`'") for s in help_text.split("are: ")[1].split(". If")[0].split(", "))
    assert tuple(names) == TRL_TYPES == L.LOSS_TYPES


@pytest.mark.parametrize("loss_type,eps", CASES)
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_each_type_matches_trl_formula_float64(loss_type, eps, beta):
    pc, pr, rc, rr, len_c, len_r = _inputs(33, seed=zlib.crc32(repr((loss_type, eps, beta)).encode()) % 1000,
                                           requires_grad=True)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=len_c, rejected_lengths=len_r,
              discopop_tau=0.05)
    losses, cr, rj = L.preference_loss(pc, pr, rc, rr, **kw)
    expected = ref_loss64(loss_type, pc, pr, rc, rr, beta, eps, len_c, len_r, tau=0.05)
    assert losses.dtype == torch.float64 and losses.shape == (33,)
    if loss_type == "sft":  # TRL repeats the batch value; ours shares it out per pair: same mean (checked below)
        torch.testing.assert_close(losses, -pc.detach() / (len_c.double().sum() / 33), rtol=RTOL, atol=0)
        losses, expected = losses.mean(), expected.mean()
    torch.testing.assert_close(losses, expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(cr, (beta * (pc - rc)).detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(rj, (beta * (pr - rr)).detach(), rtol=RTOL, atol=0)
    # gradients (TRL optimises the mean): through the sort for aot, through the batch sum for sft
    g_ours = torch.autograd.grad(losses.mean(), (pc, pr), allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(expected.mean(), (pc, pr), allow_unused=True, materialize_grads=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-15)
    if loss_type not in ("sft",):  # sft does not depend on the rejected side
        assert float(g_ours[0].abs().sum()) > 0 and float(g_ours[1].abs().sum()) > 0


def test_discopop_tau_is_used():
    pc, pr, rc, rr, _, _ = _inputs(16, seed=3)
    for tau in (0.05, 0.5, 2.0):
        got, _, _ = L.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="discopop", discopop_tau=tau)
        torch.testing.assert_close(got, ref_loss64("discopop", pc, pr, rc, rr, 0.1, tau=tau), rtol=RTOL, atol=0)
    a = L.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="discopop", discopop_tau=0.05)[0]
    b = L.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="discopop", discopop_tau=2.0)[0]
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize("types,weights,eps", [
    (["sigmoid", "sft"], [1.0, 1.0], 0.0),                  # RPO
    (["sigmoid", "sft"], None, 0.0),                         # weights default to 1.0 each
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # MPO (TRL's example weights)
    (["exo_pair", "sft", "aot"], [0.5, 2.0, 1.5], [1e-3, 0.0, 0.1]),  # ε per type
    (["ipo"], [0.25], 0.0),
])
def test_weighted_lists_are_the_weighted_sum(types, weights, eps):
    pc, pr, rc, rr, len_c, len_r = _inputs(17, seed=11, requires_grad=True)
    got, _, _ = L.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type=types, loss_weights=weights,
                                  label_smoothing=eps, chosen_lengths=len_c, rejected_lengths=len_r)
    ws = weights or [1.0] * len(types)
    es = eps if isinstance(eps, list) else [eps] * len(types)
    expected = sum(w * ref_loss64(t, pc, pr, rc, rr, 0.1, e, len_c, len_r) for t, w, e in zip(types, ws, es))
    # the batch loss (TRL's Σ_k w_k·mean(losses_k)); the per-element terms are checked per type above
    torch.testing.assert_close(got.mean(), expected.mean(), rtol=RTOL, atol=0)
    ga = torch.autograd.grad(got.mean(), (pc, pr))
    gb = torch.autograd.grad(expected.mean(), (pc, pr))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-15)


def test_classic_contract_unchanged():
    # DESIGN §4's four types keep their keyword contract: sigmoid with ε is conservative DPO, ipo needs lengths
    pc, pr, rc, rr, len_c, len_r = _inputs(9, seed=5)
    got = L.preference_loss(pc, pr, rc, rr, beta=0.2, loss_type="sigmoid", label_smoothing=0.1)[0]
    torch.testing.assert_close(got, ref_loss64("sigmoid", pc, pr, rc, rr, 0.2, 0.1), rtol=RTOL, atol=0)
    got = L.preference_loss(pc, pr, rc, rr, beta=0.2, loss_type="ipo", chosen_lengths=len_c,
                            rejected_lengths=len_r)[0]
    torch.testing.assert_close(got, ref_loss64("ipo", pc, pr, rc, rr, 0.2, 0.0, len_c, len_r), rtol=RTOL, atol=0)


@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_needs_batch_is_exactly_where_chunking_changes_the_loss(loss_type):
    # A pair-chunked caller (TRDPOLoss) sums chunk losses / B. That equals the batch loss iff the type is pairwise.
    pc, pr, rc, rr, len_c, len_r = _inputs(12, seed=21)
    rc = rc.flip(0)  # reference margins ranked unlike the policy's, so aot's sorted pairing is not the identity
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=eps)

    def batch_mean(sl):
        return L.preference_loss(pc[sl], pr[sl], rc[sl], rr[sl], chosen_lengths=len_c[sl], rejected_lengths=len_r[sl],
                                 **kw)[0].sum()

    whole = batch_mean(slice(None)) / 12
    chunked = (batch_mean(slice(0, 5)) + batch_mean(slice(5, 12))) / 12
    if L.needs_batch(loss_type):
        assert not L.is_pairwise(loss_type)
        assert float((whole - chunked).abs()) > 1e-6 * float(whole.abs())
        assert L.needs_all_logps(loss_type) == (loss_type != "sft")
        if loss_type == "sft":  # the whole batch's mean chosen length makes it chunkable
            kw["batch_mean_chosen_length"] = float(len_c.sum()) / 12
            chunked = (batch_mean(slice(0, 5)) + batch_mean(slice(5, 12))) / 12
            torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
            kw["batch_mean_chosen_length"] = len_c.sum().double() / 12  # a device scalar works too (no host sync)
            chunked = (batch_mean(slice(0, 5)) + batch_mean(slice(5, 12))) / 12
            torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    else:
        assert L.is_pairwise(loss_type) and not L.needs_all_logps(loss_type)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)


def test_needs_batch_on_lists():
    assert L.needs_batch(["sigmoid", "sft"]) and not L.needs_batch(["sigmoid", "bco_pair"])
    assert not L.needs_all_logps(["sigmoid", "sft"]) and L.needs_all_logps(["sft", "aot_unpaired"])
    assert L.is_pairwise(["ipo", "hinge"]) and not L.is_pairwise(["ipo", "aot"])
    with pytest.raises(ValueError, match="loss_type"):
        L.needs_batch("dpo")


def test_extreme_margins_stay_finite():
    big = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float32)
    z = torch.zeros(3)
    n = torch.full((3,), 5)
    for t in TRL_TYPES:
        eps = 1e-3 if t == "exo_pair" else 0.0
        losses = L.preference_loss(big, -big, z, z, beta=1.0, loss_type=t, label_smoothing=eps,
                                   chosen_lengths=n, rejected_lengths=n)[0]
        if t == "discopop":  # e^(−x) for x = −2e4 is a true overflow: +inf, never NaN (TRL's inf·0 gives NaN)
            assert not bool(losses.isnan().any()) and bool(losses[:1].isfinite().all()), losses
        elif t in ("sppo_hard", "ipo"):  # squares of 1e4: finite in fp32
            assert bool(losses.isfinite().all()), (t, losses)
        else:
            assert bool(losses.isfinite().all()), (t, losses)


def test_sft_without_chosen_tokens_is_zero_not_nan():
    x = torch.tensor([0.0, 0.0])
    losses = L.preference_loss(x, x - 1, x, x, loss_type="sft", chosen_lengths=torch.zeros(2, dtype=torch.int64))[0]
    assert losses.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(loss_type="dpo"), ValueError, "loss_type"),
    (dict(loss_type=[]), ValueError, "loss_type"),
    (dict(loss_type=["sigmoid", 3]), ValueError, "loss_type"),
    (dict(loss_type="exo_pair"), ValueError, "label_smoothing"),                 # ε must be > 0 (log ε)
    (dict(loss_type="exo_pair", label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(loss_type="aot", label_smoothing=0.6), ValueError, "label_smoothing"),
    (dict(loss_type="bco_pair", label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(loss_type=["exo_pair", "bco_pair"], label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(loss_type=["exo_pair", "bco_pair"], label_smoothing=[0.1]), ValueError, "label_smoothing"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -1.0]), ValueError, "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, float("nan")]), ValueError, "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=(1.0, "1")), TypeError, "loss_weights"),
    (dict(loss_type="sigmoid", loss_weights=2.0), TypeError, "loss_weights"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(loss_type="discopop", discopop_tau=float("inf")), ValueError, "discopop_tau"),
    (dict(loss_type="discopop", discopop_tau=True), TypeError, "discopop_tau"),
    (dict(loss_type="sft"), ValueError, "chosen_lengths"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(4)), ValueError, "rejected_lengths"),
    (dict(loss_type="sft", chosen_lengths=torch.ones(3)), ValueError, "chosen_lengths"),
    (dict(loss_type="sft", batch_mean_chosen_length=0.0), ValueError, "batch_mean_chosen_length"),
    (dict(loss_type="sft", batch_mean_chosen_length="3"), TypeError, "batch_mean_chosen_length"),
    (dict(loss_type="sft", batch_mean_chosen_length=torch.ones(2)), ValueError, "batch_mean_chosen_length"),
])
def test_bad_config_raises_naming_the_argument(kwargs, exc, match):
    x = torch.zeros(4)
    with pytest.raises(exc, match=match):
        L.preference_loss(x, x, x, x, **kwargs)


def test_check_loss_config_default_accepts_only_the_classic_four():
    # Without `accept` a caller gets the classic four; TRDPOLoss and the trdpo_loss_* entry points pass
    # accept=LOSS_TYPES now that they handle batch losses (aot in two passes, sft with the batch's mean length).
    for t in ("sigmoid", "ipo", "hinge", "robust"):
        check_loss_config(0.1, t, 0.0)
    for t in ("aot", "sft", "bco_pair"):
        with pytest.raises(ValueError, match="loss_type"):
            check_loss_config(0.1, t, 0.0)
        check_loss_config(0.1, t, 0.0, accept=L.LOSS_TYPES)
        assert L.TRDPOLoss(loss_type=t).loss_type == t
    with pytest.raises(ValueError, match="loss_type"):
        L.TRDPOLoss(loss_type="dpo")


# ---------------------------------------------------------------------------------------------------------------
# TRL's DPOTrainer end to end (fp32, 3 steps) vs FusedDPOTrainer on the same weights and batches.
# Two runs cover all 15 types through TRDPOLoss (eager on CPU): RPO (sigmoid + the batch-dependent sft), and
# every other type in one weighted list (aot/aot_unpaired sort the batch; exo_pair, robust and the aot pair read
# TRL's label_smoothing; weights keep the squared losses from dominating, so a wrong term moves the sum and its
# gradient far beyond the tolerance). 4 pairs per step so aot's sort is not trivial.
E2E = {
    "rpo": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "all_others": dict(loss_type=["aot", "aot_unpaired", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                                  "apo_down", "discopop", "sigmoid_norm", "robust", "hinge", "ipo"],
                       loss_weights=[1.0, 0.5, 1.0, 0.5, 0.5, 0.01, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.01],
                       label_smoothing=0.01, discopop_tau=0.2),
}
E2E_STEPS = 3


@pytest.mark.parametrize("case", list(E2E))
def test_same_trajectory_as_trl(tmp_path, case):
    pytest.importorskip("trl")
    from trl import DPOTrainer

    from fasttrdpo.integrations.trl.dpo import FusedDPOTrainer
    from test_trl_dpo_integration import _args, _dataset
    from fasttrdpo.tiny import tiny_model, tiny_tokenizer

    def train(cls, name):
        model, ref = tiny_model(seed=0, hidden_size=32), tiny_model(seed=0, hidden_size=32)
        args = _args(tmp_path, name, max_steps=E2E_STEPS, per_device_train_batch_size=4, **E2E[case])
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=_dataset(4 * E2E_STEPS),
                      processing_class=tiny_tokenizer())
        trainer.train()
        return trainer, [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]

    _, trl_logs = train(DPOTrainer, "trl")
    trainer, ours_logs = train(FusedDPOTrainer, "ours")
    assert type(trainer._trdpo_loss) is L.TRDPOLoss  # every type and list runs TRDPOLoss itself
    assert trainer._trdpo_loss.loss_type == E2E[case]["loss_type"]
    assert trainer._trdpo_loss.loss_weights == E2E[case]["loss_weights"]
    assert len(trl_logs) == len(ours_logs) == E2E_STEPS
    get = lambda logs, k: torch.tensor([h[k] for h in logs], dtype=torch.float64)  # noqa: E731
    trl_loss, our_loss = get(trl_logs, "loss"), get(ours_logs, "loss")
    assert float((trl_loss[0] - trl_loss[-1]).abs()) > 1e-3 * float(trl_loss[0].abs())  # the policy moved
    # fp32 sums over ≤ 48 tokens × V=384 differ from TRL's in summation order only (~1e-7 relative per
    # log-prob); 3 Adam steps at lr 3e-3 keep the trajectories within 1e-5 relative.
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=0)
    for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "rewards/accuracies"):
        torch.testing.assert_close(get(ours_logs, key), get(trl_logs, key), rtol=1e-5, atol=1e-6, msg=key)
    # rewards = β·(π − π_ref): the difference of two fp32 sums of magnitude |logps| (60-110 here), held above to
    # 1e-5 relative each. Propagated, a reward may differ by β·1e-5·(|π| + |π_ref|) = 2β·1e-5·|logps| (all
    # log-probs < 0, so the mean of |row sums| is |logps|): an absolute bound set by the log-probs' magnitude. A
    # relative bound on the reward itself (a −0.04 reward from two ~−68 sums) would ask each sum for 6e-9
    # relative, below fp32's unit roundoff; TRL and TRDPOLoss sum in different orders (observed: ~2 ulps).
    beta = trainer.beta  # 0.1 (test_trl_dpo_integration._args)
    mag_c, mag_r = get(trl_logs, "logps/chosen").abs(), get(trl_logs, "logps/rejected").abs()
    for key, atol in (("rewards/chosen", 2 * beta * 1e-5 * mag_c), ("rewards/rejected", 2 * beta * 1e-5 * mag_r),
                      ("rewards/margins", 2 * beta * 1e-5 * (mag_c + mag_r))):
        err = (get(ours_logs, key) - get(trl_logs, key)).abs()
        assert bool((err <= atol).all()), (key, err.tolist(), atol.tolist())


def test_integration_validates_loss_settings(tmp_path):
    pytest.importorskip("trl")
    from trl import DPOTrainer

    from fasttrdpo.integrations.trl.dpo import use_trdpo_loss
    from test_trl_dpo_integration import _args, _dataset
    from fasttrdpo.tiny import tiny_model, tiny_tokenizer

    for kw, exc, match in [
            (dict(loss_type=["sigmoid", "sft"], label_smoothing=0.1), ValueError, "label_smoothing"),  # TRL ignores ε
            (dict(loss_type=["aot"], label_smoothing=0.7), ValueError, "label_smoothing"),
            (dict(loss_type=["robust"], label_smoothing=0.6), ValueError, "label_smoothing"),  # TRL only warns
            (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.5]), ValueError, "loss_weights"),
            (dict(loss_type=["discopop"], discopop_tau=0.0), ValueError, "discopop_tau"),
            (dict(loss_type=["aot"], f_divergence_type="forward_kl"), ValueError, "f_divergence"),  # TRL's own check
            (dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"), NotImplementedError, "f_divergence")]:
        def make():
            return DPOTrainer(model=tiny_model(seed=1, hidden_size=32), ref_model=tiny_model(seed=1, hidden_size=32),
                              args=_args(tmp_path, "bad", max_steps=1, **kw), train_dataset=_dataset(2),
                              processing_class=tiny_tokenizer())
        with pytest.raises(exc, match=match):
            use_trdpo_loss(make())
