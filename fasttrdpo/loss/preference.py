"""Preference losses on per-sequence log-probs (DPO family and KTO), as DESIGN.md §4 defines them.

These functions see only small per-sequence tensors ([pairs] or [examples]); the expensive part, the
per-token log-probs, comes from `fasttrdpo.ops` or from `TRDPOLoss`'s chunked path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Every loss type TRL 1.16's DPOConfig accepts (TRL's order). `preference_loss` computes all of them.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# What check_loss_config accepts when the caller does not say: the four types of DESIGN.md §4. A caller that
# handles the whole family (batch losses included, see needs_batch) passes accept=LOSS_TYPES, as TRDPOLoss,
# trdpo_loss_from_tokens / _from_logits and preference_loss do.
CLASSIC_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# A pair's loss depends on other pairs of the batch: aot/aot_unpaired sort log-ratios over the batch; TRL's sft
# is the mean NLL over all chosen tokens of the batch (a token-weighted mean, not a mean of per-pair means).
BATCH_LOSS_TYPES = frozenset({"aot", "aot_unpaired", "sft"})
# Of those, the ones that need every pair's log-probs before any pair's loss (sorting). sft needs only the
# batch's chosen token count, known from the labels up front (batch_mean_chosen_length).
ALL_LOGPS_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# Need completion lengths (token counts): chosen_lengths for sft, both for ipo and sigmoid_norm.
LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm", "sft"})
# Allowed label_smoothing per type (lo, hi, hi_inclusive); every other type has no smoothed form and needs 0.
# sigmoid with ε > 0 is conservative DPO (TRL's sigmoid ignores ε); exo_pair needs ε > 0 (it takes log ε).
_SMOOTHING_RANGE = {"sigmoid": (0.0, 0.5, True), "robust": (0.0, 0.5, False), "aot": (0.0, 0.5, True),
                    "aot_unpaired": (0.0, 0.5, True), "exo_pair": (0.0, 1.0, False)}


def _as_type_list(loss_type) -> list:
    if isinstance(loss_type, str):
        return [loss_type]
    if isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(t, str) for t in loss_type):
        return list(loss_type)
    raise ValueError(f"loss_type must be a loss name or a non-empty list of loss names, got {loss_type!r}")


def _known_types(loss_type) -> list:
    types = _as_type_list(loss_type)
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type must be among {LOSS_TYPES}, got {t!r}")
    return types


def needs_batch(loss_type) -> bool:
    """True when some pair's loss depends on other pairs of the batch (aot, aot_unpaired, sft; for a list, any).

    A caller that finishes the loss chunk by chunk over pairs (TRDPOLoss) cannot call preference_loss on a
    chunk as if it were the batch. For sft it suffices to pass the whole batch's batch_mean_chosen_length to
    every chunk's call (the per-pair sft terms then add up to TRL's batch loss); where needs_all_logps is also
    True, every pair's sequence log-probs must be computed first and preference_loss called once on the batch.
    """
    return any(t in BATCH_LOSS_TYPES for t in _known_types(loss_type))


def needs_all_logps(loss_type) -> bool:
    """True when a pair's loss needs every pair's log-probs first (aot, aot_unpaired sort over the batch)."""
    return any(t in ALL_LOGPS_LOSS_TYPES for t in _known_types(loss_type))


def is_pairwise(loss_type) -> bool:
    """True when each pair's loss depends on that pair alone (the negation of needs_batch)."""
    return not needs_batch(loss_type)


def _check_number(name, v, *, positive=False, nonneg=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonneg and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _normalized_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau, accept):
    """Validate everything; return (types, per-type ε, per-type weights). Nothing is computed before this."""
    types = _as_type_list(loss_type)
    for t in types:
        if t not in accept:
            raise ValueError(f"loss_type must be one of {tuple(accept)}, got {t!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not beta > 0 or beta != beta or beta == float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if isinstance(label_smoothing, (list, tuple)):
        if len(label_smoothing) != len(types):
            raise ValueError(f"label_smoothing as a list must have one value per loss_type ({len(types)}), "
                             f"got {len(label_smoothing)}")
        eps_list = [_check_number("label_smoothing", e) for e in label_smoothing]
    else:
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
        eps_list = [float(label_smoothing)] * len(types)
    for t, eps in zip(types, eps_list):
        if t not in _SMOOTHING_RANGE:
            if eps != 0.0:
                hint = (" (give label_smoothing as a list, one value per loss_type, to smooth only some of them)"
                        if len(types) > 1 else "")
                raise ValueError(f"label_smoothing must be 0 for loss_type={t!r} (it has no smoothed form), "
                                 f"got {eps}{hint}")
            continue
        lo, hi, hi_in = _SMOOTHING_RANGE[t]
        ok = (lo < eps if t == "exo_pair" else lo <= eps) and (eps <= hi if hi_in else eps < hi)
        if not ok:
            rng = f"{'(' if t == 'exo_pair' else '['}{lo}, {hi}{']' if hi_in else ')'}"
            extra = " (conservative DPO)" if t == "sigmoid" else ""
            raise ValueError(f"label_smoothing must lie in {rng} for loss_type={t!r}{extra}, got {eps}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)):
            raise TypeError(f"loss_weights must be a list of floats, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss_type ({len(types)}), got {len(loss_weights)}")
        weights = [_check_number("loss_weights", w, nonneg=True) for w in loss_weights]
    _check_number("discopop_tau", discopop_tau, positive=True)
    return types, eps_list, weights


def check_loss_config(beta, loss_type, label_smoothing, *, loss_weights=None, discopop_tau: float = 0.05,
                      accept=CLASSIC_LOSS_TYPES) -> None:
    """Validate the loss configuration shared by preference_loss and TRDPOLoss; ValueError/TypeError naming it.

    loss_type: one name or a list (summed with loss_weights, default 1.0 each); label_smoothing: one float for
    every type or a list, one per type (each must fit its type: see _SMOOTHING_RANGE; 0 for a type without a
    smoothed form); discopop_tau > 0. accept: the loss types this caller can compute (default: the classic
    four; preference_loss accepts LOSS_TYPES).
    """
    _normalized_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau, accept)


def _check_per_sequence(name: str, t, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [batch], got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} like the other log-probs, got {tuple(t.shape)}")


def _check_lengths(name: str, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the log-probs are on {device}")


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                    beta: float = 0.1, loss_type="sigmoid", label_smoothing=0.0,
                    chosen_lengths=None, rejected_lengths=None, loss_weights=None, discopop_tau: float = 0.05,
                    batch_mean_chosen_length=None):
    """Per-pair DPO-family losses from summed completion log-probs: every loss type of TRL 1.16's DPOConfig.

    c = π_c − ref_c, r = π_r − ref_r (log-ratios of the summed log-probs), Δ = c − r, x = βΔ, ε = label_smoothing,
    n_c, n_r = completion lengths clamped to ≥ 1, L = logσ:
      sigmoid       −(1−ε)·L(x) − ε·L(−x)         (ε = 0: DPO, TRL's sigmoid; ε > 0: conservative DPO)
      hinge         relu(1 − x)
      ipo           (c/n_c − r/n_r − 1/(2β))²
      exo_pair      σ(x)·(L(x) − log(1−ε)) + σ(−x)·(L(−x) − log ε),  ε ∈ (0, 1)
      nca_pair      −L(βc) − ½L(−βc) − ½L(−βr)
      robust        (−(1−ε)·L(x) + ε·L(−x)) / (1 − 2ε),  ε ∈ [0, 0.5)
      bco_pair      −L(βc) − L(−βr)   (TRL 1.16 keeps no running reward mean, so neither do we: no state)
      sppo_hard     (c − 1/(2β))² + (r + 1/(2β))²
      aot           sigmoid(ε) on d_i = sort(π_c − π_r)_i − sort(ref_c − ref_r)_i   (sorted over the batch)
      aot_unpaired  sigmoid(ε) on d_i = sort(c)_i − sort(r)_i                       (sorted over the batch)
      apo_zero      1 − σ(βc) + σ(βr)
      apo_down      σ(βc) + 1 − σ(x)
      discopop      (1 − m)·(−L(x)) + m·e^(−x),  m = σ(x/τ), τ = discopop_tau   (m·e^(−x) as e^(L(x/τ) − x))
      sft           −π_c / n̄_c, n̄_c = Σ_batch n_c / B (unclamped lengths, Σ clamped to ≥ 1): the mean over the
                    batch is TRL's −Σ π_c / Σ n_c, the mean NLL over all chosen tokens of the batch (0 when the
                    batch has no chosen token, where TRL gives NaN); n̄_c comes from chosen_lengths, or from
                    batch_mean_chosen_length when given (a chunked caller passes the whole batch's)
      sigmoid_norm  −L(β·(c/n_c − r/n_r))

    loss_type may be a list: losses = Σ_k loss_weights[k]·losses_k (weights default to 1.0; RPO is
    ["sigmoid", "sft"]). label_smoothing is one float for all types or a list, one per type; a type without a
    smoothed form needs 0. Lengths (token counts) are needed by ipo, sigmoid_norm (both) and sft (chosen, unless
    batch_mean_chosen_length is given). aot, aot_unpaired and sft depend on the whole batch (see needs_batch):
    aot's losses[i] are the sorted terms, not pair i's; losses.mean() is the batch loss, as TRL optimises it. Returns (losses[B], chosen_rewards[B], rejected_rewards[B]); rewards are β·(policy − ref) of
    the summed log-probs, detached (they are metrics).
    """
    types, eps_list, weights = _normalized_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau,
                                                  LOSS_TYPES)
    _check_per_sequence("policy_chosen_logps", policy_chosen_logps)
    shape = policy_chosen_logps.shape
    _check_per_sequence("policy_rejected_logps", policy_rejected_logps, shape)
    _check_per_sequence("ref_chosen_logps", ref_chosen_logps, shape)
    _check_per_sequence("ref_rejected_logps", ref_rejected_logps, shape)
    device = policy_chosen_logps.device
    for name, t in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but policy_chosen_logps is on {device}")
    if batch_mean_chosen_length is not None:
        if isinstance(batch_mean_chosen_length, torch.Tensor):  # a device scalar: no host sync to check its value
            if batch_mean_chosen_length.dim() != 0 or batch_mean_chosen_length.device != device:
                raise ValueError(f"batch_mean_chosen_length must be a 0-dim tensor on {device} or a number, got shape "
                                 f"{tuple(batch_mean_chosen_length.shape)} on {batch_mean_chosen_length.device}")
        else:
            _check_number("batch_mean_chosen_length", batch_mean_chosen_length, positive=True)
    needed = []
    if any(t in ("ipo", "sigmoid_norm") for t in types) or ("sft" in types and batch_mean_chosen_length is None):
        needed.append(("chosen_lengths", chosen_lengths))
    if any(t in ("ipo", "sigmoid_norm") for t in types):
        needed.append(("rejected_lengths", rejected_lengths))
    if needed:
        for name, t in needed:
            if t is None:
                which = [x for x in types if x in LENGTH_LOSS_TYPES]
                raise ValueError(f"loss_type {which} needs {name} (completion token counts)")
            _check_lengths(name, t, shape, device)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    dtype = chosen_logratios.dtype
    total = None
    for t, eps, w in zip(types, eps_list, weights):
        losses = _one_loss(t, float(beta), eps, float(discopop_tau), policy_chosen_logps, policy_rejected_logps,
                           ref_chosen_logps, ref_rejected_logps, chosen_logratios, rejected_logratios,
                           chosen_lengths, rejected_lengths, dtype, batch_mean_chosen_length)
        if len(types) > 1 or w != 1.0:
            losses = w * losses
        total = losses if total is None else total + losses

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return total, chosen_rewards, rejected_rewards


def _smoothed_sigmoid(x, eps):
    """−(1−ε)·logσ(x) − ε·logσ(−x) (ε = 0: plain −logσ(x), no extra term)."""
    losses = -F.logsigmoid(x)
    if eps != 0.0:
        losses = (1.0 - eps) * losses - eps * F.logsigmoid(-x)
    return losses


def _one_loss(loss_type, beta, eps, tau, pc, pr, rc, rr, c, r, len_c, len_r, dtype, mean_len_c):
    if loss_type in ("ipo", "sigmoid_norm"):
        delta_len = c / len_c.to(dtype).clamp(min=1.0) - r / len_r.to(dtype).clamp(min=1.0)
        if loss_type == "ipo":
            return (delta_len - 1.0 / (2.0 * beta)) ** 2
        return -F.logsigmoid(beta * delta_len)
    if loss_type == "sft":
        # TRL: −mean over every chosen completion token of the batch = −Σ π_c / Σ n_c (token-weighted), shared
        # out as pair i's −π_c,i / n̄_c so that pairs (and chunks of pairs) add up to it
        if mean_len_c is None:
            mean_len_c = len_c.to(dtype).sum().clamp(min=1.0) / max(pc.numel(), 1)
        return -pc / mean_len_c
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        else:
            d = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
        return _smoothed_sigmoid(beta * d, eps)
    x = beta * (c - r)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(x, eps)
    if loss_type == "hinge":
        return torch.relu(1.0 - x)
    if loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":
        # KL(softmax over {chosen, rejected} of x || [1−ε, ε]), expanded
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1.0 - torch.sigmoid(x)
    if loss_type == "discopop":
        # σ(x/τ)·e^(−x) = e^(logσ(x/τ) − x): finite where TRL's product turns into inf·0 = NaN (x ≪ 0)
        modulation = torch.sigmoid(x / tau)
        return (1.0 - modulation) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / tau) - x)
    raise AssertionError(loss_type)  # unreachable: _normalized_config accepted it


def kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO on unpaired examples, as TRL defines it (TR-KTO when ref_logps come from a moving reference).

    z = clamp(mean(policy_kl_logps − ref_kl_logps), min=0), detached: the reference-KL estimate from
    mismatched (prompt, completion) pairs. With r = policy_logps − ref_logps:
      desirable    w_d·(1 − σ(β·(r − z)))
      undesirable  w_u·(1 − σ(β·(z − r)))
    Returns (losses[B], rewards[B] = β·r detached, kl = z).
    """
    check_loss_config(beta, "sigmoid", 0.0)
    _check_per_sequence("policy_logps", policy_logps)
    shape = policy_logps.shape
    _check_per_sequence("ref_logps", ref_logps, shape)
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a torch.Tensor, got {type(desirable).__name__}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor (True = desirable example), got {desirable.dtype}")
    if tuple(desirable.shape) != tuple(shape):
        raise ValueError(f"desirable must have shape {tuple(shape)}, got {tuple(desirable.shape)}")
    _check_per_sequence("policy_kl_logps", policy_kl_logps)
    _check_per_sequence("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape)
    if policy_kl_logps.numel() == 0:
        raise ValueError("policy_kl_logps is empty: the KL estimate needs at least one example")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {w!r}")
    for name, t in (("ref_logps", ref_logps), ("desirable", desirable), ("policy_kl_logps", policy_kl_logps),
                    ("ref_kl_logps", ref_kl_logps)):
        if t.device != policy_logps.device:
            raise ValueError(f"{name} is on {t.device} but policy_logps is on {policy_logps.device}")

    kl = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    logratios = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, (beta * logratios).detach(), kl


def sequence_logprobs(token_logps, labels, ignore_index: int = -100):
    """Per-sequence sums of token log-probs over the last dimension, and completion lengths.

    token_logps [..., T] (float), labels [..., T] (int64; ignore_index marks prompt/padding). Ignored
    positions contribute nothing even if token_logps holds garbage there. Returns (sums[...] in the
    log-probs' dtype, lengths[...] int64).
    """
    if not isinstance(token_logps, torch.Tensor) or not token_logps.is_floating_point():
        raise TypeError("token_logps must be a floating-point torch.Tensor")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError("labels must be an int64 torch.Tensor")
    if token_logps.dim() < 1 or tuple(labels.shape) != tuple(token_logps.shape):
        raise ValueError(f"labels must have token_logps' shape {tuple(token_logps.shape)}, got {tuple(labels.shape)}")
    if labels.device != token_logps.device:
        raise ValueError(f"labels is on {labels.device} but token_logps is on {token_logps.device}")
    mask = labels != ignore_index
    sums = torch.where(mask, token_logps, torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)).sum(-1)
    return sums, mask.sum(-1)
