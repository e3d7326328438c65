"""KTOLoss: KTO (TR-KTO with a moving reference) straight from hidden states and the lm_head weight.

The per-token log-probs come from `fasttrdpo.ops.linear.paired_linear_token_logprobs` (policy and reference in
one call, logits never stored: triton on CUDA, chunked eager on CPU); the loss is `kto_loss` on their per-row
sums. KTO's loss of a row depends only on that row's log-ratio and on the detached batch KL estimate z, so any
per-token op suffices (no pair structure, nothing batch-wide but z).

KL estimate (TRL 1.16's KTOTrainer): z = clamp(mean over rows of log π(y'|x) − log π_ref(y'|x), min=0), detached,
where (x, y') are mismatched prompt/completion rows of the same batch (TRL: row i's prompt with row i−1's
completion, cyclically). `kl_logps` computes the two KL sums without autograd; the caller may gather them over
ranks (TRL averages z over processes before the clamp) and passes them to `forward`.

Metrics (TRL's KTO names, one value per micro-batch as TRL appends them): kl, rewards/chosen, rewards/rejected,
rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected. "chosen" = desirable rows. TRL
gathers per-class sums and counts over all ranks and divides once (rewards/logps by the global number of
desirable / undesirable rows, logits by the global number of their completion tokens): `forward(reduce_sums=...)`
receives those sums (`KTO_SUMS` layout) and may all-reduce them before the division. A metric TRL would not append
for this batch (no desirable, or no undesirable, row anywhere) is NaN here: the trainer averages the values present,
as TRL's `log` averages its lists.
With token_stats=True the metrics also hold TRL's `entropy`: the mean policy entropy over the rows' completion
tokens (TRL's KTOTrainer logs it from its fused head; here `fasttrdpo.ops.linear_token_stats` recomputes it from
the policy's hidden states without grad, one more policy logits GEMM over the completion tokens).
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_float, check_labels_tensor, check_same_device
from .preference import kto_loss

# per-micro-batch metric names, in the order KTOLoss returns them (TRL 1.16's KTOTrainer names)
KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected")
# the per-class sums and counts the ratio metrics are made of, in the order of the vector KTOLoss reduces
KTO_SUMS = ("rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum",
            "logits/chosen_sum", "logits/rejected_sum", "count/chosen", "count/rejected", "tokens/chosen",
            "tokens/rejected")


def kto_metrics_from_sums(kl: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics from a `KTO_SUMS` vector (summed over whatever rows / ranks it covers): class sums over
    class counts, 0/0 = NaN where a class is absent (TRL appends nothing then); margins = chosen − rejected."""
    s = dict(zip(KTO_SUMS, sums.float().unbind(-1)))
    out = {"kl": kl.float()}
    for name in ("chosen", "rejected"):
        out[f"rewards/{name}"] = s[f"rewards/{name}_sum"] / s[f"count/{name}"]
        out[f"logps/{name}"] = s[f"logps/{name}_sum"] / s[f"count/{name}"]
        out[f"logits/{name}"] = s[f"logits/{name}_sum"] / s[f"tokens/{name}"]
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return {k: out[k].detach() for k in KTO_METRICS}


def _weight(name: str, w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {w!r}")
    return float(w)


class KTOLoss(nn.Module):
    """KTO of a policy against a (trust-region) reference, from hidden states.

    forward(policy_hidden [B, T, H], policy_weight [V, H], labels [B, T], ref_hidden [B, T, H'], ref_weight [V, H'],
            desirable [B] bool, policy_kl_logps [K], ref_kl_logps [K], *, policy_bias=None, ref_bias=None,
            reduce_sums=None) -> (loss, metrics)
    loss = mean over rows of w·(1 − σ(β·(r − z))) (desirable) or w·(1 − σ(β·(z − r))) (undesirable), as TRL's
    `losses.nanmean()`; metrics as the module docstring says (detached tensors, no host sync).
    reduce_sums: optional callable given this batch's `KTO_SUMS` vector [10] (fp32) and returning the vector to
    divide (e.g. its all-reduce over ranks, as TRL gathers before dividing); None = this batch's rows alone.
    Labels are shifted (label t is the token position t predicts); ignore_index marks prompt and padding.
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 ignore_index: int = -100, *, backend: str = "auto", validate: bool = True,
                 token_stats: bool = False):
        super().__init__()
        if not isinstance(token_stats, bool):
            raise TypeError(f"token_stats must be a bool, got {type(token_stats).__name__}")
        self.token_stats = token_stats
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a number > 0, got {beta!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.beta = float(beta)
        self.desirable_weight = _weight("desirable_weight", desirable_weight)
        self.undesirable_weight = _weight("undesirable_weight", undesirable_weight)
        self.ignore_index = ignore_index
        self.backend = backend
        self.validate = bool(validate)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
                f"undesirable_weight={self.undesirable_weight}, ignore_index={self.ignore_index}, "
                f"backend={self.backend!r}")

    def _sequence_logps(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias):
        from ..ops.linear import paired_linear_token_logprobs

        check_float("policy_hidden", policy_hidden, min_dim=2)
        check_float("ref_hidden", ref_hidden, min_dim=2)
        check_labels_tensor(labels, policy_hidden.shape[:-1])
        if labels.dim() < 1 or labels.shape[0] < 1:
            raise ValueError(f"labels must be [rows, ...] with at least one row, got shape {tuple(labels.shape)}")
        check_same_device(policy_hidden=policy_hidden, policy_weight=policy_weight, labels=labels,
                          ref_hidden=ref_hidden, ref_weight=ref_weight, policy_bias=policy_bias, ref_bias=ref_bias)
        pol_tok, ref_tok = paired_linear_token_logprobs(
            policy_hidden, policy_weight, ref_hidden, ref_weight, labels, policy_bias=policy_bias, ref_bias=ref_bias,
            ignore_index=self.ignore_index, validate=self.validate, backend=self.backend)
        B = labels.shape[0]
        # ignored positions are exactly 0.0 in the op's output: a plain row sum is the completion's log-prob
        return pol_tok.reshape(B, -1).sum(1), ref_tok.reshape(B, -1).sum(1)

    @torch.no_grad()
    def kl_logps(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, *, policy_bias=None,
                 ref_bias=None):
        """(policy, reference) sequence log-probs of the mismatched KL rows [K], without autograd (TRL computes
        them under no_grad: z is a detached constant of the loss)."""
        return self._sequence_logps(policy_hidden.detach(), policy_weight.detach(), labels, ref_hidden, ref_weight,
                                    None if policy_bias is None else policy_bias.detach(), ref_bias)

    def forward(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, desirable, policy_kl_logps,
                ref_kl_logps, *, policy_bias=None, ref_bias=None, reduce_sums=None):
        if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
            raise TypeError("desirable must be a bool torch.Tensor (True = desirable row)")
        if isinstance(labels, torch.Tensor) and tuple(desirable.shape) != tuple(labels.shape[:1]):
            raise ValueError(f"desirable must have shape ({labels.shape[0] if labels.dim() else 0},) (one flag per "
                             f"row of labels), got {tuple(desirable.shape)}")
        policy_logps, ref_logps = self._sequence_logps(policy_hidden, policy_weight, labels, ref_hidden, ref_weight,
                                                       policy_bias, ref_bias)
        losses, rewards, kl = kto_loss(policy_logps, ref_logps, desirable.to(policy_logps.device), policy_kl_logps,
                                       ref_kl_logps, beta=self.beta, desirable_weight=self.desirable_weight,
                                       undesirable_weight=self.undesirable_weight)
        with torch.no_grad():
            sums = self._metric_sums(policy_hidden, policy_weight, policy_bias, labels, desirable,
                                     policy_logps.detach(), rewards)
            if reduce_sums is not None:
                sums = reduce_sums(sums)
            metrics = kto_metrics_from_sums(kl, sums)
            if self.token_stats:
                metrics["entropy"] = self._entropy(policy_hidden, policy_weight, policy_bias, labels)
        return losses.mean(), metrics

    def _entropy(self, policy_hidden, policy_weight, policy_bias, labels):
        """TRL's KTO `entropy`: Σ entropy / Σ tokens over the rows' completion tokens (0.0 without any, as TRL)."""
        from ..ops.linear import linear_token_stats

        entropy, _ = linear_token_stats(policy_hidden.detach(), policy_weight.detach(), labels,
                                        bias=None if policy_bias is None else policy_bias.detach(),
                                        ignore_index=self.ignore_index, validate=False, backend=self.backend)
        tokens = (labels != self.ignore_index).sum().float()
        return (entropy.sum() / tokens.clamp(min=1.0)).float()

    def _metric_sums(self, policy_hidden, policy_weight, policy_bias, labels, desirable, policy_logps, rewards):
        B = labels.shape[0]
        flat = labels.reshape(B, -1)
        mask = flat != self.ignore_index
        # the mean logit over the vocabulary of a token is h·mean_v(W) + mean(b): no logits needed
        w_mean = policy_weight.detach().float().mean(0)
        mean_logit = policy_hidden.detach().reshape(B, flat.shape[1], -1).float() @ w_mean
        if policy_bias is not None:
            mean_logit = mean_logit + policy_bias.detach().float().mean()
        logit_sums = torch.where(mask, mean_logit, torch.zeros((), device=mean_logit.device)).sum(1)
        tokens = mask.sum(1).float()
        d = desirable.to(rewards.device)
        parts = {}
        for name, rows in (("chosen", d), ("rejected", ~d)):
            parts[f"rewards/{name}_sum"] = torch.where(rows, rewards, 0.0).sum()
            parts[f"logps/{name}_sum"] = torch.where(rows, policy_logps, 0.0).sum()
            parts[f"logits/{name}_sum"] = torch.where(rows, logit_sums, 0.0).sum()
            parts[f"count/{name}"] = rows.sum()
            parts[f"tokens/{name}"] = torch.where(rows, tokens, 0.0).sum()
        return torch.stack([parts[k].float() for k in KTO_SUMS])
