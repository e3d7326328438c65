"""Held-out evaluation: the DPO loss and TRL's reward metrics against the current reference, the same
rewards against the initial model, and the exact per-token KL(policy || reference) and
KL(policy || initial) over the whole vocabulary (logits formed a chunk of tokens at a time)."""
from __future__ import annotations

import torch
import torch.distributed as dist

# metric names logged per training step (TRL's names), in the order TRDPOLoss returns them
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def kl_sum(hidden_p, head_p, hidden_q, head_q, chunk_tokens: int) -> float:
    """sum over tokens of KL(p || q) = sum_v p_v (log p_v - log q_v), in fp32, chunked over tokens."""
    total = 0.0
    wp, wq = head_p.weight.float(), head_q.weight.float()
    bp = None if head_p.bias is None else head_p.bias.float()
    bq = None if head_q.bias is None else head_q.bias.float()
    for i in range(0, hidden_p.shape[0], chunk_tokens):
        lp = torch.log_softmax(torch.nn.functional.linear(hidden_p[i:i + chunk_tokens].float(), wp, bp), -1)
        lq = torch.log_softmax(torch.nn.functional.linear(hidden_q[i:i + chunk_tokens].float(), wq, bq), -1)
        total += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
    return total


@torch.no_grad()
def evaluate(trainer) -> dict:
    """The evaluation record of `trainer` (a TRDPOTrainer) on its eval pairs, sharded over ranks."""
    if not trainer.eval_pairs:
        raise ValueError("evaluate() needs an eval_dataset")
    if getattr(trainer, "sharded", None) is not None:
        from .fsdp import evaluate_sharded

        return evaluate_sharded(trainer)
    c = trainer.config
    was_training = trainer.model.training
    trainer.model.eval()
    mine = trainer.eval_pairs[trainer.rank::trainer.world_size]
    n_metrics = 1 + len(TRL_METRICS)
    # + pairs, kl_ref, kl_init, tokens, accuracy and margin of the rewards measured against the initial model
    sums = torch.zeros(n_metrics + 6, dtype=torch.float64, device=trainer.device)
    policy, ref_head = trainer.policy, trainer.ref_head
    for start in range(0, len(mine), c.per_device_eval_batch_size):
        pairs = mine[start:start + c.per_device_eval_batch_size]
        batch = trainer._batch(pairs)
        with trainer._autocast():
            hidden = policy(batch["input_ids"], batch["attention_mask"])
            ref_hidden = trainer._ref_hidden(trainer.ref_model, batch)
        loss, metrics = trainer.loss_fn(hidden, policy.head.weight, batch["labels"], ref_hidden,
                                        ref_head.weight, policy_bias=policy.head.bias, ref_bias=ref_head.bias)
        n = len(pairs)
        vec = torch.stack([loss.float()] + [metrics[k].float().reshape(()) for k in TRL_METRICS])
        sums[:n_metrics] += vec.double() * n
        sums[n_metrics] += n
        if c.eval_kl:
            mask = batch["labels"] != trainer.collator.ignore_index
            h = hidden[mask]
            sums[n_metrics + 1] += kl_sum(h, policy.head, ref_hidden[mask], ref_head, c.kl_chunk_tokens)
            if trainer.init_model is not None:
                init_head = trainer.init_model.get_output_embeddings()
                with trainer._autocast():
                    init_hidden = trainer._ref_hidden(trainer.init_model, batch)
                sums[n_metrics + 2] += kl_sum(h, policy.head, init_hidden[mask], init_head, c.kl_chunk_tokens)
                _, vs_init = trainer.loss_fn(hidden, policy.head.weight, batch["labels"], init_hidden,
                                             init_head.weight, policy_bias=policy.head.bias,
                                             ref_bias=init_head.bias)
                sums[n_metrics + 4] += float(vs_init["rewards/accuracies"]) * n
                sums[n_metrics + 5] += float(vs_init["rewards/margins"]) * n
            sums[n_metrics + 3] += int(mask.sum())
    if trainer.world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    if was_training:
        trainer.model.train()
    return finish_record(trainer, sums.tolist(), n_metrics)


def finish_record(trainer, s: list[float], n_metrics: int) -> dict:
    """The evaluation record from the summed figures (all ranks summed)."""
    c = trainer.config
    pairs_total = max(s[n_metrics], 1.0)
    record = {"step": trainer.global_step, "eval_loss": s[0] / pairs_total}
    record.update({f"eval_{k}": v / pairs_total for k, v in zip(TRL_METRICS, s[1:n_metrics])})
    if c.eval_kl:
        tokens = max(s[n_metrics + 3], 1.0)
        record["eval_kl/ref"] = s[n_metrics + 1] / tokens
        if trainer.init_model is not None:
            record["eval_kl/init"] = s[n_metrics + 2] / tokens
            # the same rewards measured against the initial model instead of the moving reference
            record["eval_init_rewards/accuracies"] = s[n_metrics + 4] / pairs_total
            record["eval_init_rewards/margins"] = s[n_metrics + 5] / pairs_total
    record["eval_pairs"] = int(s[n_metrics])
    record["ref_updates"] = trainer.ref_updates
    return record
