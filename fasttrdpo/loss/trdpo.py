"""TRDPOLoss (hidden states + lm_head weight → DPO-family loss and TRL's metrics) and trdpo_loss_from_logits."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._backend import resolve_backend
from .._validate import check_float, check_label_range, check_labels_tensor, check_same_device
from ._chunked import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_PAIR_BYTES, ChunkedTRDPOFunction
from .preference import check_loss_config, preference_loss, sequence_logprobs


def _pair_metrics(policy_logps, ref_logps, beta, mean_logit_sums, lengths):
    """TRL's DPO metrics as detached tensors (no host sync). Rows: first half chosen, second half rejected."""
    P = policy_logps.shape[0] // 2
    policy_logps, ref_logps = policy_logps.detach(), ref_logps.detach()
    chosen_rewards = beta * (policy_logps[:P] - ref_logps[:P])
    rejected_rewards = beta * (policy_logps[P:] - ref_logps[P:])
    lengths = lengths.to(mean_logit_sums.dtype)
    # TRL averages the per-token vocabulary mean over all completion tokens of the batch (0 when none).
    logits_chosen = mean_logit_sums[:P].sum() / lengths[:P].sum().clamp(min=1.0)
    logits_rejected = mean_logit_sums[P:].sum() / lengths[P:].sum().clamp(min=1.0)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_logps[:P].mean(),
        "logps/rejected": policy_logps[P:].mean(),
        "logits/chosen": logits_chosen.detach(),
        "logits/rejected": logits_rejected.detach(),
    }


def _check_rows(labels):
    B = labels.shape[0] if labels.dim() > 0 else 0
    if labels.dim() < 1 or B < 2 or B % 2:
        raise ValueError(
            f"labels must be [rows, ...] with an even number of rows >= 2 (first half chosen, second half "
            f"rejected), got shape {tuple(labels.shape)}")


def _check_transform(logit_scale, softcap):
    # The ops' rule (finite and > 0), shared so that no backend accepts what another refuses.
    from .._validate import check_logit_transform

    check_logit_transform(logit_scale, softcap)


def _mean_logit_per_token(hidden, weight, bias, logit_scale, softcap, mask, chunk_tokens):
    """Vocabulary mean of the (transformed) logits at each completion token, no grad, 0 elsewhere."""
    with torch.no_grad():
        H = hidden.shape[-1]
        h = hidden.reshape(-1, H)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        if softcap is None:
            w_mean = weight.mean(0, dtype=torch.float32)  # no fp32 copy of a bf16 weight
            m = h.float() @ w_mean
            if bias is not None:
                m = m + bias.float().mean()
            out = torch.where(mask.reshape(-1), m * logit_scale, out)
        else:  # not linear in the logits: form them chunk by chunk (only models with a softcap pay this)
            idx = mask.reshape(-1).nonzero().squeeze(1)
            w32 = weight.float()
            b32 = bias.float() if bias is not None else None
            for s in range(0, idx.numel(), chunk_tokens):
                sel = idx[s:s + chunk_tokens]
                z = h[sel].float() @ w32.T
                if b32 is not None:
                    z += b32
                z = softcap * torch.tanh(z * (logit_scale / softcap))
                out[sel] = z.mean(1)
        return out.view(mask.shape)


class TRDPOLoss(nn.Module):
    """DPO-family loss of a policy against a (trust-region) reference, straight from hidden states.

    forward(policy_hidden [B, T, H], policy_weight [V, H], labels [B, T], ref_hidden [B, T, H'],
            ref_weight [V, H'], *, policy_bias=None, ref_bias=None) -> (loss, metrics)

    Rows: first B/2 chosen, last B/2 rejected (pair i = rows i and B/2 + i). Labels are shifted
    (label t is the token that position t predicts); ignore_index marks prompt and padding. loss is the
    mean over pairs; metrics are TRL's (detached tensors, no host sync). Gradients flow to
    policy_hidden, policy_weight and policy_bias only.

    backend: "eager" runs the chunked path of `_chunked.py` (loss and gradient finished chunk by chunk
    over whole pairs; one host sync to plan the chunks); "triton" runs the paired lm_head kernel
    (`fasttrdpo.ops.linear.paired_linear_token_logprobs`) with the loss on top; "auto" picks as every op
    does (DESIGN.md §4) among triton and eager ("cpp" is logits-level only: asking for it raises).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, *, logit_scale: float = 1.0, softcap: float | None = None,
                 validate: bool = True, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_pair_bytes: int = DEFAULT_MAX_PAIR_BYTES):
        super().__init__()
        check_loss_config(beta, loss_type, label_smoothing)
        _check_transform(logit_scale, softcap)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        for name, v in (("chunk_bytes", chunk_bytes), ("max_pair_bytes", max_pair_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index
        self.logit_scale = float(logit_scale)
        self.softcap = None if softcap is None else float(softcap)
        self.validate = bool(validate)
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.max_pair_bytes = max_pair_bytes

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}")

    def _check(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias):
        check_float("policy_hidden", policy_hidden, min_dim=2)
        check_float("ref_hidden", ref_hidden, min_dim=2)
        check_float("policy_weight", policy_weight, min_dim=2)
        check_float("ref_weight", ref_weight, min_dim=2)
        for name, w in (("policy_weight", policy_weight), ("ref_weight", ref_weight)):
            if w.dim() != 2:
                raise ValueError(f"{name} must be [V, H], got shape {tuple(w.shape)}")
        check_labels_tensor(labels, policy_hidden.shape[:-1])
        _check_rows(labels)
        if tuple(ref_hidden.shape[:-1]) != tuple(labels.shape):
            raise ValueError(f"ref_hidden must have shape {tuple(labels.shape)} + [H], got {tuple(ref_hidden.shape)}")
        V, H = policy_weight.shape
        if policy_hidden.shape[-1] != H:
            raise ValueError(f"policy_hidden's last dim must equal policy_weight's H={H}, got {policy_hidden.shape[-1]}")
        if ref_weight.shape[0] != V:
            raise ValueError(f"ref_weight must have V={V} rows like policy_weight, got {ref_weight.shape[0]}")
        if ref_hidden.shape[-1] != ref_weight.shape[1]:
            raise ValueError(f"ref_hidden's last dim must equal ref_weight's H={ref_weight.shape[1]}, "
                             f"got {ref_hidden.shape[-1]}")
        for name, b in (("policy_bias", policy_bias), ("ref_bias", ref_bias)):
            if b is not None:
                check_float(name, b)
                if tuple(b.shape) != (V,):
                    raise ValueError(f"{name} must have shape ({V},), got {tuple(b.shape)}")
        check_same_device(policy_hidden=policy_hidden, policy_weight=policy_weight, labels=labels,
                          ref_hidden=ref_hidden, ref_weight=ref_weight, policy_bias=policy_bias, ref_bias=ref_bias)

    def _resolve(self, device):
        # The C++ extension covers the logits level only: TRDPOLoss provides triton and eager (its CPU path).
        return resolve_backend("TRDPOLoss", self.backend, device, provides=("triton", "eager"))

    def forward(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, *, policy_bias=None,
                ref_bias=None):
        self._check(policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias)
        backend = self._resolve(labels.device)
        # fp32 math whatever autocast says: the inputs are used as stored (bf16 hidden from an autocast
        # backbone is fine), but no matmul in here may drop to bf16.
        with torch.autocast(device_type=labels.device.type, enabled=False):
            if backend == "eager":
                return self._forward_eager(policy_hidden, policy_weight, labels, ref_hidden, ref_weight,
                                           policy_bias, ref_bias)
            return self._forward_op(policy_hidden, policy_weight, labels, ref_hidden, ref_weight,
                                    policy_bias, ref_bias, backend)

    def _forward_eager(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias):
        # Out-of-range labels would index out of bounds in the chunked path: always checked here.
        check_label_range(labels, policy_weight.shape[0], self.ignore_index)
        cfg = (self.beta, self.loss_type, self.label_smoothing, self.ignore_index, self.logit_scale, self.softcap,
               self.chunk_bytes, self.max_pair_bytes, torch.is_grad_enabled())
        loss, policy_logps, ref_logps, mean_logit_sums = ChunkedTRDPOFunction.apply(
            policy_hidden, policy_weight, policy_bias, ref_hidden.detach(), ref_weight.detach(),
            None if ref_bias is None else ref_bias.detach(), labels, cfg)
        lengths = (labels.reshape(labels.shape[0], -1) != self.ignore_index).sum(1)
        return loss, _pair_metrics(policy_logps, ref_logps, self.beta, mean_logit_sums, lengths)

    def _forward_op(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias,
                    backend):
        from ..ops.linear import paired_linear_token_logprobs

        policy_tok, ref_tok = paired_linear_token_logprobs(
            policy_hidden, policy_weight, ref_hidden.detach(), ref_weight.detach(), labels,
            policy_bias=policy_bias, ref_bias=None if ref_bias is None else ref_bias.detach(),
            ignore_index=self.ignore_index, logit_scale=self.logit_scale, softcap=self.softcap,
            validate=self.validate, backend=backend)
        B = labels.shape[0]
        flat_labels = labels.reshape(B, -1)
        policy_logps, lengths = sequence_logprobs(policy_tok.reshape(B, -1), flat_labels, self.ignore_index)
        ref_logps, _ = sequence_logprobs(ref_tok.reshape(B, -1), flat_labels, self.ignore_index)
        loss = _loss_from_sequence_logps(policy_logps, ref_logps, lengths, self.beta, self.loss_type,
                                         self.label_smoothing)
        mask = labels != self.ignore_index
        chunk_tokens = max(1, self.chunk_bytes // (4 * policy_weight.shape[0]))
        mean_tok = _mean_logit_per_token(policy_hidden, policy_weight, policy_bias, self.logit_scale, self.softcap,
                                         mask, chunk_tokens)
        mean_logit_sums = mean_tok.reshape(B, -1).sum(1)
        return loss, _pair_metrics(policy_logps, ref_logps, self.beta, mean_logit_sums, lengths)


def _loss_from_sequence_logps(policy_logps, ref_logps, lengths, beta, loss_type, label_smoothing):
    """Mean over pairs of the preference loss; rows: first half chosen, second half rejected."""
    P = policy_logps.shape[0] // 2
    losses, _, _ = preference_loss(
        policy_logps[:P], policy_logps[P:], ref_logps[:P], ref_logps[P:], beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, chosen_lengths=lengths[:P], rejected_lengths=lengths[P:])
    return losses.mean()


def trdpo_loss_from_logits(policy_logits, ref_logits, labels, *, beta: float = 0.1, loss_type: str = "sigmoid",
                           label_smoothing: float = 0.0, ignore_index: int = -100, validate: bool = True,
                           backend: str = "auto"):
    """The TRDPOLoss computation for code that already holds logits [B, T, V] (policy and reference).

    Log-probs come from `fasttrdpo.ops.logits.paired_token_logprobs` (fused, the reference without
    grad); rows and metrics as in TRDPOLoss. Returns (loss, metrics).
    """
    check_loss_config(beta, loss_type, label_smoothing)
    from ..ops.logits import paired_token_logprobs

    check_float("policy_logits", policy_logits, min_dim=2)
    check_labels_tensor(labels, policy_logits.shape[:-1])
    _check_rows(labels)
    policy_tok, ref_tok = paired_token_logprobs(policy_logits, ref_logits, labels, ignore_index=ignore_index,
                                                validate=validate, backend=backend)
    B = labels.shape[0]
    flat_labels = labels.reshape(B, -1)
    policy_logps, lengths = sequence_logprobs(policy_tok.reshape(B, -1), flat_labels, ignore_index)
    ref_logps, _ = sequence_logprobs(ref_tok.reshape(B, -1), flat_labels, ignore_index)
    loss = _loss_from_sequence_logps(policy_logps, ref_logps, lengths, beta, loss_type, label_smoothing)
    with torch.no_grad():
        mean_tok = policy_logits.detach().mean(-1, dtype=torch.float32)
        mean_tok = torch.where(labels != ignore_index, mean_tok, torch.zeros((), device=mean_tok.device))
        mean_logit_sums = mean_tok.reshape(B, -1).sum(1)
    return loss, _pair_metrics(policy_logps, ref_logps, float(beta), mean_logit_sums, lengths)
