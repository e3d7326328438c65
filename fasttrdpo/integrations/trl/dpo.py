"""TRL's DPOTrainer with its loss computed by `fasttrdpo.loss.TRDPOLoss`.

TRL (≥ 1.16) gets per-token log-probs from its own fused lm_head patch and builds the loss on top.
Here the policy and reference backbones return their last hidden states instead, and TRDPOLoss goes
from (hidden, lm_head.weight) to the loss and its gradient in one fused step (policy and reference
log-probs, the loss, no [tokens × vocab] logits). Everything else (data, collator, optimizer,
reference handling, PEFT adapters, logging) is TRL's.

    from fasttrdpo.integrations.trl import FusedDPOTrainer
    trainer = FusedDPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(...), train_dataset=ds,
                              processing_class=tokenizer)          # same arguments as DPOTrainer

or switch an existing trainer: `use_trdpo_loss(trainer)`.

Logged metrics: TRL's `rewards/*`, `logps/*`, `logits/*`, `num_tokens`, `entropy` (mean policy entropy over all
completion tokens) and `mean_token_accuracy` (top-1 accuracy over the chosen completion tokens), TRL's
definitions; the last two are computed in TRDPOLoss's pass (token_stats=True, no logits kept). Per-token means
(`logits/*`, `entropy`, `mean_token_accuracy`) are reduced as TRL reduces them: token sums and token counts
gathered over processes, then divided; the per-pair ones (`rewards/*`, `logps/*`) as TRL: gathered, then mean.
With `sync_ref_model=True` the fused trainer replaces TRL's SyncRefModelCallback by
`FusedSyncRefModelCallback` itself. Under `DPOConfig(bf16=True)` (TRL's default) the policy and the
reference backbones run under accelerate's autocast exactly as TRL runs them; TRDPOLoss then does fp32
math on their fp32 hidden states (TRL's head rounds its logits tiles to bf16 instead).

Sharded training (accelerate FSDP2, DeepSpeed ZeRO-3; `sharding.py`): the policy's loss is computed inside its
forward, as a call of its head module, so the framework holds the full head weight there and reduces its gradient
like any other; the reference's head is read inside the reference's forward. Settings no test proves under
sharding (ZeRO stages 0-2, offload, FSDP1, mixed precision, PEFT) raise at construction.

Supported: every `loss_type` of TRL 1.16 and weighted lists (`loss_weights`, e.g. RPO = ["sigmoid", "sft"]),
`discopop_tau`, `label_smoothing` where TRL applies it (exo_pair, robust, aot, aot_unpaired), the standard
reverse-KL DPO, no `ld_alpha`, no WPO weighting, no precomputed reference log-probs, no MoE auxiliary loss;
other settings raise at construction instead of silently training something else. Every type and list runs
TRDPOLoss (aot / aot_unpaired in its two-pass mode: one more policy logits GEMM per chunk).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import types
import warnings

import torch
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ...loss import LOSS_TYPES, TRDPOLoss
from ...loss.preference import check_loss_config
from .sharding import NONE, head_snapshot, run_in_head, sharding_mode

try:  # PEFT is optional
    from peft import PeftModel
except ImportError:  # pragma: no cover
    PeftModel = None

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_HIDDEN_FLAG = "fasttrdpo_hidden"
_log = logging.getLogger("fasttrdpo")


def _is_peft(model) -> bool:
    return PeftModel is not None and isinstance(model, PeftModel)


def _logit_transform(model):
    """(logit_scale, softcap) of the model's head, read from its config as TRL's fused head does."""
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1.0 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


class HeadRequest:
    """What a hidden-state forward should do with the backbone's last hidden state [B, T, H], inside the forward:
    kind "reference": return (hidden[:, :-1], head weight, head bias) read inside the call of the head module
    (copied when `copy_head`: the sharding framework frees the full weight when the forward returns);
    kind "loss": return `loss_fn(hidden[:, :-1], head.weight, head.bias)` = (loss, metrics), computed inside
    the call of the head module, so FSDP2/ZeRO-3 hold the full weight and reduce its gradient (sharding.py)."""

    def __init__(self, kind: str, *, copy_head: bool = False, loss_fn=None):
        if kind not in ("reference", "loss"):
            raise ValueError(f"kind must be 'reference' or 'loss', got {kind!r}")
        self.kind, self.copy_head, self.loss_fn = kind, copy_head, loss_fn


def _answer(model, request, hidden):
    if request is True:  # plain hidden states (the PEFT reference path, unsharded)
        return hidden
    if request.kind == "reference":
        return run_in_head(model, hidden, lambda head, h: (h[:, :-1],) + head_snapshot(head, request.copy_head))
    return run_in_head(model, hidden, lambda head, h: request.loss_fn(h[:, :-1], head.weight,
                                                                     getattr(head, "bias", None)))


def add_hidden_state_forward(model, *, mixed_precision=None) -> None:
    """Patch `model.forward` so that `model(..., fasttrdpo_hidden=True)` returns the backbone's last hidden
    state [B, T, H] (no lm_head), and `model(..., fasttrdpo_hidden=HeadRequest(...))` does what the request
    says with it inside the forward. Calls go through the (possibly DDP/FSDP2/DeepSpeed/PEFT-wrapped) model as
    usual, so gradient synchronization, sharding hooks and adapters still apply; without the flag the previous
    forward runs.

    mixed_precision: a context-manager factory (e.g. `accelerator.autocast`) to run the hidden branch under,
    with half-precision outputs returned in fp32. Needed when `model.forward` was ALREADY wrapped by
    accelerate's autocast (TRL prepares `ref_model` in its constructor, before this patch): the hidden
    branch goes to the backbone directly and would otherwise skip that wrapper. A model patched before
    accelerate wraps it (the policy, prepared in `train()`) gets the wrapper around this forward and needs none.
    """
    if getattr(model, "_fasttrdpo_hidden_forward", False):
        return
    previous_forward = model.forward
    precision = mixed_precision if mixed_precision is not None else contextlib.nullcontext

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        request = kwargs.pop(_HIDDEN_FLAG, None)
        if request is None or request is False:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        with precision():
            hidden = self.base_model(*args, **kwargs).last_hidden_state
        if mixed_precision is not None and hidden.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.float()  # as accelerate's convert_outputs_to_fp32 does for the wrapped forward
        return _answer(self, request, hidden)

    model.forward = types.MethodType(forward, model)
    model._fasttrdpo_hidden_forward = True


# The loss types whose formula in TRL 1.16 reads args.label_smoothing (the others ignore it)
_TRL_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")


def _trl_label_smoothing(trainer) -> list:
    """label_smoothing per loss type as TRL applies it: its value where TRL's formula uses it, 0 elsewhere."""
    eps = float(trainer.args.label_smoothing)
    return [eps if t in _TRL_SMOOTHED else 0.0 for t in trainer.loss_types]


def _check_supported(trainer) -> None:
    args = trainer.args
    loss_types = list(trainer.loss_types)
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise NotImplementedError(f"fasttrdpo's DPO loss supports loss_type among {LOSS_TYPES}, got {unknown}")
    if trainer.f_divergence_type != "reverse_kl":
        raise NotImplementedError(f"f_divergence_type={trainer.f_divergence_type!r}: only reverse_kl (DPO) is fused")
    if trainer.ld_alpha is not None:
        raise NotImplementedError("ld_alpha (LD-DPO) is not supported by fasttrdpo's loss")
    if trainer.use_weighting:
        raise NotImplementedError("use_weighting (WPO) is not supported by fasttrdpo's loss")
    if trainer.precompute_ref_logps:
        raise NotImplementedError("precompute_ref_log_probs is not supported: TRDPOLoss computes the reference "
                                  "log-probs itself (TR-DPO's reference moves, so they cannot be precomputed)")
    if trainer.aux_loss_enabled:
        raise NotImplementedError("MoE router auxiliary loss is not supported by fasttrdpo's loss")
    eps = float(args.label_smoothing)
    if eps != 0.0 and not any(t in _TRL_SMOOTHED for t in loss_types):
        # TRL ignores it for these types; fasttrdpo would not silently drop an option (nor train conservative DPO)
        raise ValueError(f"label_smoothing != 0 with loss_type={loss_types}: TRL ignores it for these types (sigmoid "
                         "would be conservative DPO in fasttrdpo); use 'robust'/'exo_pair'/'aot' or set "
                         "label_smoothing=0")
    # every value checked here (ValueError naming it) before anything is patched
    check_loss_config(trainer.beta, loss_types, _trl_label_smoothing(trainer), loss_weights=list(trainer.loss_weights),
                      discopop_tau=args.discopop_tau, accept=LOSS_TYPES)


def use_trdpo_loss(trainer, *, backend: str = "auto") -> "DPOTrainer":
    """Switch an existing DPOTrainer to compute its loss with TRDPOLoss (in place; returns the trainer)."""
    _check_supported(trainer)
    trainer._fasttrdpo_sharding = sharding_mode(trainer)  # raises for sharded set-ups no test proves
    policy = trainer.model.get_base_model() if _is_peft(trainer.model) else trainer.model
    add_hidden_state_forward(policy)
    if trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        # TRL runs its reference through `accelerator.prepare_model(ref_model, evaluation_mode=True)`, which (with
        # native mixed precision, e.g. DPOConfig(bf16=True), TRL's default) wraps ref.forward in autocast and
        # records the unwrapped forward as `_original_forward`. Run the hidden branch under that same autocast;
        # under DeepSpeed/FSDP TRL prepares the reference without the wrapper, and so do we.
        wrapped = getattr(ref, "_original_forward", None) is not None
        add_hidden_state_forward(ref, mixed_precision=trainer.accelerator.autocast if wrapped else None)
    scale, softcap = _logit_transform(policy)
    loss_types, weights = list(trainer.loss_types), [float(w) for w in trainer.loss_weights]
    eps = _trl_label_smoothing(trainer)
    if len(loss_types) == 1 and weights == [1.0]:  # one type: TRDPOLoss's plain form (no list, no weight)
        trainer._trdpo_loss = TRDPOLoss(beta=trainer.beta, loss_type=loss_types[0], label_smoothing=eps[0],
                                        discopop_tau=trainer.args.discopop_tau, logit_scale=scale, softcap=softcap,
                                        backend=backend, token_stats=True)
    else:
        trainer._trdpo_loss = TRDPOLoss(beta=trainer.beta, loss_type=loss_types, label_smoothing=eps,
                                        loss_weights=weights, discopop_tau=trainer.args.discopop_tau,
                                        logit_scale=scale, softcap=softcap, backend=backend, token_stats=True)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _compute_loss(self, model, inputs, return_outputs):
    mode = "train" if self.model.training else "eval"
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    completion_mask = inputs["completion_mask"]
    # TRL's labels: completion tokens only; label t (after the shift) is the token position t predicts
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:]
    sharded = getattr(self, "_fasttrdpo_sharding", NONE) != NONE

    # The reference first (no grad): its hidden states and its head, read inside its own forward.
    with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
        if self.ref_model is None:  # PEFT: the reference is the model with its adapter off (or the "ref" adapter)
            unwrapped = self.accelerator.unwrap_model(self.model)
            policy_model = unwrapped.get_base_model() if _is_peft(unwrapped) else unwrapped
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                ref_hidden = self.model(**model_kwargs, **{_HIDDEN_FLAG: True})[:, :-1]
                ref_weight, ref_bias = (t.detach() if t is not None else None for t in _head(policy_model))
        else:
            ref_hidden, ref_weight, ref_bias = self.ref_model(
                **model_kwargs, **{_HIDDEN_FLAG: HeadRequest("reference", copy_head=sharded)})

    def policy_loss(hidden, weight, bias):
        # Runs inside the policy's forward, in the call of its head module (sharding.run_in_head).
        device = weight.device
        return self._trdpo_loss(hidden.to(device), weight, labels.to(device), ref_hidden.to(device),
                                ref_weight.to(device), policy_bias=bias,
                                ref_bias=None if ref_bias is None else ref_bias.to(device))

    loss, metrics = model(**model_kwargs, **{_HIDDEN_FLAG: HeadRequest("loss", loss_fn=policy_loss)})

    # TRL's logging: gathered across processes, then .item() (TRL syncs here too)
    gather = self.accelerator.gather_for_metrics
    # logits/*, entropy, mean_token_accuracy: TRL divides the gathered token sums by the gathered token counts
    # (the chosen / rejected / all / chosen completion tokens; 0.0 without any), not a mean of per-process means
    completion_tokens = (labels != -100).sum(1).to(loss.device)
    half = labels.shape[0] // 2  # rows: chosen, then rejected
    counts = {"logits/chosen": completion_tokens[:half].sum(), "logits/rejected": completion_tokens[half:].sum(),
              "entropy": completion_tokens.sum(), "mean_token_accuracy": completion_tokens[:half].sum()}
    for key, value in metrics.items():
        if key in counts:
            total = gather(counts[key].float().reshape(1)).sum()
            token_sum = gather((value * counts[key]).float().reshape(1)).sum()
            self._metrics[mode][key].append((token_sum / total).item() if total > 0 else 0.0)
        else:
            self._metrics[mode][key].append(gather(value.reshape(1)).mean().item())
    if mode == "train":
        n_tokens = gather(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += n_tokens // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    if return_outputs:
        warnings.warn("return_outputs=True recomputes the logits with an extra forward pass", stacklevel=2)
        with torch.no_grad():
            outputs = model(**model_kwargs)
        return loss, outputs
    return loss


class FusedDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is computed by fasttrdpo's TRDPOLoss (same constructor; `fasttrdpo_backend`
    picks the TRDPOLoss backend, "auto" by default, for the loss and the reference blend).

    With `DPOConfig(sync_ref_model=True)` (TR-DPO) the reference updates run through
    `FusedSyncRefModelCallback` (one fused blend, saved with checkpoints and restored on resume) in place of
    TRL's SyncRefModelCallback, on the same schedule (`ref_model_mixup_alpha`, `ref_model_sync_steps`);
    `self.ref_sync_callback` is that callback (None without sync_ref_model)."""

    def __init__(self, *args, fasttrdpo_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        use_trdpo_loss(self, backend=fasttrdpo_backend)
        self.ref_sync_callback = None
        if self.args.sync_ref_model:
            from .callback import FusedSyncRefModelCallback

            self.ref_sync_callback = FusedSyncRefModelCallback.replace_in(self, backend=fasttrdpo_backend)
            _log.info("FusedDPOTrainer: sync_ref_model=True, reference updates by FusedSyncRefModelCallback "
                      "(alpha=%s every %s steps) instead of TRL's SyncRefModelCallback",
                      self.args.ref_model_mixup_alpha, self.args.ref_model_sync_steps)
