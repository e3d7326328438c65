"""TRDPOLoss (hidden states + lm_head weight → DPO-family loss and TRL's metrics) and trdpo_loss_from_logits."""
from __future__ import annotations

import torch
from torch import nn

from .._backend import resolve_backend
from .._validate import check_float, check_label_range, check_labels_tensor, check_same_device
from ._chunked import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_PAIR_BYTES, ChunkedTRDPOFunction, _types, loss_config
from .token_list import DEFAULT_TILE_BYTES, run_token_chunks
from .preference import preference_loss, sequence_logprobs


def _pair_metrics(policy_logps, ref_logps, beta, mean_logit_sums, lengths, stat_sums=None):
    """TRL's DPO metrics as detached tensors (no host sync). Rows: first half chosen, second half rejected.
    stat_sums [rows, 2] (per row Σ policy entropy, Σ [label is argmax]) adds TRL's `entropy` (mean over all
    completion tokens) and `mean_token_accuracy` (over the chosen completion tokens only, as TRL's
    DPOTrainer); 0 when there are no tokens, as TRL."""
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
    } | ({} if stat_sums is None else {
        "entropy": stat_sums[:, 0].sum() / lengths.sum().clamp(min=1.0),
        "mean_token_accuracy": stat_sums[:P, 1].sum() / lengths[:P].sum().clamp(min=1.0),
    })


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


class TRDPOLoss(nn.Module):
    """DPO-family loss of a policy against a (trust-region) reference, straight from hidden states.

    forward(policy_hidden [B, T, H], policy_weight [V, H], labels [B, T], ref_hidden [B, T, H'],
            ref_weight [V, H'], *, policy_bias=None, ref_bias=None) -> (loss, metrics)

    Rows: first B/2 chosen, last B/2 rejected (pair i = rows i and B/2 + i). Labels are shifted
    (label t is the token that position t predicts); ignore_index marks prompt and padding. loss is the
    mean over pairs; metrics are TRL's (detached tensors, no host sync). Gradients flow to
    policy_hidden, policy_weight and policy_bias only.

    Loss: every loss type of TRL 1.16 (`fasttrdpo.loss.LOSS_TYPES`, formulas in `preference_loss`), or a list
    of them summed with loss_weights (RPO = ["sigmoid", "sft"]); label_smoothing one float or one per type;
    discopop_tau for discopop. Pairwise types and sft are finished chunk by chunk in one pass (sft with the
    whole batch's mean chosen length). aot and aot_unpaired sort over the whole batch, so both backends run
    two passes: every row's log-probs first, the loss once on the batch, then the gradients chunk by chunk
    — one more policy logits GEMM per chunk than the other types (the reference is not recomputed).

    backend: "eager" runs the chunked path of `_chunked.py` (fp32 logits; loss and gradient finished chunk
    by chunk over whole pairs; one host sync to plan the chunks); "triton" (what auto picks on CUDA) runs
    `token_list.py`: the valid rows are gathered and, per chunk of whole pairs, logits by GEMM (cuBLAS;
    half operands, fp32 accumulation, the tile in the half dtype), the paired Triton log-prob kernels,
    the loss, the in-place backward kernel and two gradient GEMMs; deterministic. "auto" picks as every
    op does (DESIGN.md §4) among triton and eager ("cpp" is logits-level only: asking for it raises).

    token_stats: metrics also hold TRL's `entropy` (mean policy entropy over all completion tokens) and
    `mean_token_accuracy` (share of chosen completion tokens whose label is the policy's argmax; ties: the first
    maximal index, torch.argmax's and TRL's rule), computed in the pass that forms the log-sum-exp (triton: an
    optional output of the same kernel, a constexpr flag so nothing is compiled in when off; eager: from the
    chunk's fp32 log-softmax). Off by default: no extra cost.

    chunk_bytes: memory budget of one chunk's logits; None = the backend's default (eager: 32 MiB of fp32
    logits, `DEFAULT_CHUNK_BYTES`; triton: 4 GiB of policy + reference tiles, `DEFAULT_TILE_BYTES`, which
    holds >= 4096 tokens at V = 128256 so the GEMMs stay compute-bound). A chunk holds whole pairs; a
    pair longer than max(chunk_bytes, max_pair_bytes) is done in two passes (its logits formed twice).
    """

    def __init__(self, beta: float = 0.1, loss_type="sigmoid", label_smoothing=0.0,
                 ignore_index: int = -100, *, loss_weights=None, discopop_tau: float = 0.05,
                 logit_scale: float = 1.0, softcap: float | None = None,
                 validate: bool = True, backend: str = "auto", chunk_bytes: int | None = None,
                 max_pair_bytes: int = DEFAULT_MAX_PAIR_BYTES, token_stats: bool = False):
        super().__init__()
        if not isinstance(token_stats, bool):
            raise TypeError(f"token_stats must be a bool, got {type(token_stats).__name__}")
        self.token_stats = token_stats
        self._loss_kw = loss_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau)
        _check_transform(logit_scale, softcap)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        for name, v in (("chunk_bytes", chunk_bytes), ("max_pair_bytes", max_pair_bytes)):
            if name == "chunk_bytes" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.ignore_index = ignore_index
        self.logit_scale = float(logit_scale)
        self.softcap = None if softcap is None else float(softcap)
        self.validate = bool(validate)
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.max_pair_bytes = max_pair_bytes

    # The loss settings are validated once, at construction, and read-only after (a new TRDPOLoss for others).
    @property
    def beta(self) -> float:
        return self._loss_kw["beta"]

    @property
    def loss_type(self):
        """The loss name, or the list of names as given."""
        t = self._loss_kw["loss_type"]
        return t if isinstance(t, str) else list(t)

    @property
    def label_smoothing(self):
        e = self._loss_kw["label_smoothing"]
        return e if isinstance(e, float) else list(e)

    @property
    def loss_weights(self):
        w = self._loss_kw["loss_weights"]
        return None if w is None else list(w)

    @property
    def discopop_tau(self) -> float:
        return self._loss_kw["discopop_tau"]

    def extra_repr(self) -> str:
        extra = f", loss_weights={self.loss_weights}" if self.loss_weights is not None else ""
        if "discopop" in _types(self._loss_kw):
            extra += f", discopop_tau={self.discopop_tau}"
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}{extra}, "
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
        # Autocast off: the inputs are used as stored (bf16 hidden from an autocast backbone is fine). eager:
        # fp32 matmuls; triton: the GEMM dtype follows the stored dtypes (token_list.gemm_dtype), never
        # autocast's region dtype, so the same inputs give the same result inside and outside autocast.
        with torch.autocast(device_type=labels.device.type, enabled=False):
            if backend == "eager":
                return self._forward_eager(policy_hidden, policy_weight, labels, ref_hidden, ref_weight,
                                           policy_bias, ref_bias)
            return self._forward_tokens(policy_hidden, policy_weight, labels, ref_hidden, ref_weight,
                                        policy_bias, ref_bias)

    def _forward_eager(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias):
        # Out-of-range labels would index out of bounds in the chunked path: always checked here.
        check_label_range(labels, policy_weight.shape[0], self.ignore_index)
        chunk_bytes = DEFAULT_CHUNK_BYTES if self.chunk_bytes is None else self.chunk_bytes
        cfg = (self._loss_kw, self.ignore_index, self.logit_scale, self.softcap, chunk_bytes, self.max_pair_bytes,
               torch.is_grad_enabled(), self.token_stats)
        loss, policy_logps, ref_logps, mean_logit_sums, stat_sums = ChunkedTRDPOFunction.apply(
            policy_hidden, policy_weight, policy_bias, ref_hidden.detach(), ref_weight.detach(),
            None if ref_bias is None else ref_bias.detach(), labels, cfg)
        lengths = (labels.reshape(labels.shape[0], -1) != self.ignore_index).sum(1)
        return loss, _pair_metrics(policy_logps, ref_logps, self.beta, mean_logit_sums, lengths,
                                   stat_sums if self.token_stats else None)

    def _forward_tokens(self, policy_hidden, policy_weight, labels, ref_hidden, ref_weight, policy_bias, ref_bias):
        """The triton backend: gather the valid rows, then `token_list.run_token_chunks` (its docstring)."""
        if self.validate:
            check_label_range(labels, policy_weight.shape[0], self.ignore_index)
        B = labels.shape[0]
        flat_labels = labels.reshape(-1)
        mask = flat_labels != self.ignore_index
        valid = mask.nonzero().squeeze(1)  # row-major: each row's tokens contiguous, rows in slot order
        lengths = mask.view(B, -1).sum(1)
        loss, policy_logps, ref_logps, mean_logit_sums, stat_sums = run_token_chunks(
            policy_hidden.reshape(-1, policy_hidden.shape[-1]), policy_weight, policy_bias,
            ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias, valid, valid, flat_labels[valid],
            lengths.tolist(), loss_kw=self._loss_kw, logit_scale=self.logit_scale, softcap=self.softcap,
            chunk_bytes=DEFAULT_TILE_BYTES if self.chunk_bytes is None else self.chunk_bytes,
            max_pair_bytes=self.max_pair_bytes, middle="triton", token_stats=self.token_stats)
        return loss, _pair_metrics(policy_logps, ref_logps, self.beta, mean_logit_sums, lengths,
                                   stat_sums if self.token_stats else None)


def _loss_from_sequence_logps(policy_logps, ref_logps, lengths, loss_kw):
    """Mean over pairs of the preference loss on the whole batch; rows: first half chosen, second half rejected."""
    P = policy_logps.shape[0] // 2
    losses, _, _ = preference_loss(
        policy_logps[:P], policy_logps[P:], ref_logps[:P], ref_logps[P:], chosen_lengths=lengths[:P],
        rejected_lengths=lengths[P:], **loss_kw)
    return losses.mean()


def trdpo_loss_from_logits(policy_logits, ref_logits, labels, *, beta: float = 0.1, loss_type="sigmoid",
                           label_smoothing=0.0, ignore_index: int = -100, loss_weights=None,
                           discopop_tau: float = 0.05, validate: bool = True, backend: str = "auto"):
    """The TRDPOLoss computation for code that already holds logits [B, T, V] (policy and reference).

    Log-probs come from `fasttrdpo.ops.logits.paired_token_logprobs` (fused, the reference without
    grad); rows, metrics and the loss options (every TRL 1.16 type, lists, loss_weights, discopop_tau) as in
    TRDPOLoss; the loss is formed once on the whole batch (autograd does the rest). Returns (loss, metrics).
    """
    loss_kw = loss_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau)
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
    loss = _loss_from_sequence_logps(policy_logps, ref_logps, lengths, loss_kw)
    with torch.no_grad():
        mean_tok = policy_logits.detach().mean(-1, dtype=torch.float32)
        mean_tok = torch.where(labels != ignore_index, mean_tok, torch.zeros((), device=mean_tok.device))
        mean_logit_sums = mean_tok.reshape(B, -1).sum(1)
    return loss, _pair_metrics(policy_logps, ref_logps, float(beta), mean_logit_sums, lengths)
