"""Preference losses on per-sequence log-probs (DPO family and KTO), as DESIGN.md §4 defines them.

These functions see only small per-sequence tensors ([pairs] or [examples]); the expensive part, the
per-token log-probs, comes from `fasttrdpo.ops` or from `TRDPOLoss`'s chunked path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def check_loss_config(beta, loss_type: str, label_smoothing) -> None:
    """Validate the (β, loss_type, ε) triple shared by preference_loss and TRDPOLoss."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not beta > 0 or beta != beta or beta == float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    eps = float(label_smoothing)
    if loss_type in ("hinge", "ipo") and eps != 0.0:
        raise ValueError(f"label_smoothing must be 0 for loss_type={loss_type!r} (it has no smoothed form), got {eps}")
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5] for loss_type='sigmoid' (conservative DPO), got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {eps}")


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
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO-family losses from summed completion log-probs.

    Δ = (π_c − ref_c) − (π_r − ref_r), ε = label_smoothing:
      sigmoid  −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)          (ε = 0: standard DPO; ε > 0: conservative DPO)
      hinge    relu(1 − βΔ)
      ipo      (Δ_len − 1/(2β))², each log-ratio divided by its completion length (clamped to ≥ 1)
      robust   (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)
    Lengths are needed (and used) by ipo only. Returns (losses[B], chosen_rewards[B], rejected_rewards[B]);
    rewards are β·(policy − ref) of the summed log-probs, detached (they are metrics).
    """
    check_loss_config(beta, loss_type, label_smoothing)
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

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    eps = float(label_smoothing)

    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
        _check_lengths("chosen_lengths", chosen_lengths, shape, device)
        _check_lengths("rejected_lengths", rejected_lengths, shape, device)
        dtype = chosen_logratios.dtype
        delta_len = (chosen_logratios / chosen_lengths.to(dtype).clamp(min=1.0)
                     - rejected_logratios / rejected_lengths.to(dtype).clamp(min=1.0))
        losses = (delta_len - 1.0 / (2.0 * beta)) ** 2
    else:
        logits = beta * (chosen_logratios - rejected_logratios)
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(logits)
            if eps != 0.0:
                losses = (1.0 - eps) * losses - eps * F.logsigmoid(-logits)
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - logits)
        else:  # robust
            losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


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
