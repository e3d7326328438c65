"""The TR-DPO loss family (formulas in the README's "Losses" section): preference losses on
per-sequence log-probs, KTO, and `TRDPOLoss`, which goes from hidden states and the lm_head weight to
the loss without ever holding [tokens × vocab] logits beyond one chunk.

    import fasttrdpo.loss
    loss_fn = fasttrdpo.loss.TRDPOLoss(beta=0.1)
    loss, metrics = loss_fn(policy_hidden, lm_head.weight, labels, ref_hidden, ref_lm_head.weight)
"""
from .preference import (LOSS_TYPES, is_pairwise, kto_loss, needs_all_logps, needs_batch, preference_loss,
                         sequence_logprobs)
from .kto import KTO_METRICS, KTOLoss
from .token_list import trdpo_loss_from_tokens
from .trdpo import TRDPOLoss, trdpo_loss_from_logits

__all__ = ["LOSS_TYPES", "preference_loss", "kto_loss", "sequence_logprobs", "TRDPOLoss",
           "trdpo_loss_from_logits", "trdpo_loss_from_tokens", "needs_batch", "needs_all_logps", "is_pairwise",
           "KTOLoss", "KTO_METRICS"]
