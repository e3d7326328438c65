"""Backbone / lm_head plumbing of a Hugging Face causal LM.

Training never calls the CausalLM forward (that would form [tokens x vocabulary] logits): the backbone
gives the final hidden states and `TRDPOLoss` takes them with the lm_head weight.
"""
from __future__ import annotations

import copy

import torch


def causal_lm_parts(model):
    """(backbone, lm_head) of a Hugging Face causal LM: the backbone returns hidden states, no logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError("model must be a causal LM with an output embedding (lm_head) Linear layer")
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (model.base_model)")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"model config sets {attr}={value}: its logits are transformed after the lm_head, which "
                "TRDPOLoss does not apply; training it would use wrong log-probs")
    return backbone, head


class HiddenStates(torch.nn.Module):
    """The module DDP wraps: runs the backbone only and returns the last hidden states."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.backbone, self.head = causal_lm_parts(model)

    def forward(self, input_ids, attention_mask, position_ids=None):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere in `model`, as TRL's `disable_dropout=True`: every `nn.Dropout` gets p = 0,
    and so does the float `attention_dropout` that Llama-style attention passes to its kernel (TRL
    leaves that one alone; it is 0 in released configs). With dropout on, the policy in train mode and
    its reference in eval mode are different functions even with identical weights: step 1 would not
    start at loss ln 2 with zero rewards."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen_copy(model, dtype: torch.dtype | None):
    """A deep copy in eval mode without gradients (the reference, the initial model)."""
    twin = copy.deepcopy(model)
    if dtype is not None:
        twin.to(dtype)
    twin.eval()
    twin.requires_grad_(False)
    return twin


def frozen_hidden_states(model, batch) -> torch.Tensor:
    """Hidden states of a frozen model (the reference, or the initial model) without autograd."""
    backbone = causal_lm_parts(model)[0]
    with torch.no_grad():
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.last_hidden_state


def tied_parameter_names(model) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied.add(name)
            tied.add(seen[key])
        seen[key] = name
    return tied
