"""TR-KTO: KTO on unpaired data with the trust-region (moving) reference, on TRDPOTrainer's loop.

The TR-DPO paper applies the reference update to KTO as well: every tau optimizer steps the same
`RefModelUpdater` blends the policy into the reference (θ_ref ← θ_ref + α·(θ − θ_ref)). Everything else is
TRL 1.16's KTOTrainer: its data processing (`fasttrdpo.unpaired_data`), its KL estimate from mismatched rows of
the batch (row i's prompt with row i−1's completion; z averaged over ranks before the clamp, as TRL gathers it),
its loss and its metric names (`fasttrdpo.loss.KTOLoss`, class sums all-reduced over ranks before dividing), its
data order (train_sampling_strategy "sequential" by default: dataset order, so each micro-batch is one of TRL's fixed
per-device KL blocks; "random" reshuffles every epoch). The loop, optimizer, schedule, checkpoints, DDP and
logging are TRDPOTrainer's; this class supplies the data, the batch and the loss.

    config = TRDPOConfig(trainer="kto", beta=0.1, alpha=0.6, tau=64, desirable_weight=1.0, ...)
    TRKTOTrainer(model, tokenizer, dataset, config).train()
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .loss.kto import KTO_METRICS, KTO_SUMS, KTOLoss, kto_metrics_from_sums
from .trainer import TRDPOTrainer
from .training.config import TRDPOConfig
from .training.evaluate import kl_sum
from .unpaired_data import TokenizedExample, UnpairedCollator, kl_partners, tokenize_unpaired_dataset

__all__ = ["TRKTOTrainer"]

_log = logging.getLogger("fasttrdpo")


def _warn_weights(examples, desirable_weight: float, undesirable_weight: float) -> None:
    """TRL's advice when desirable and undesirable rows are unbalanced (the KTO paper's Eq. 8 range):
    n_d·w_d / (n_u·w_u) should lie in [1, 4/3]."""
    n_d = max(sum(e.desirable for e in examples), 1)
    n_u = max(len(examples) - n_d, 1)
    if n_d == n_u:
        return
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if not (d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi):
        _log.warning("%d desirable and %d undesirable training rows, and the weights are outside the KTO paper's "
                     "range: set EITHER desirable_weight in [%s, %s] OR undesirable_weight in [%s, %s] (as TRL "
                     "advises)", n_d, n_u, d_lo, d_hi, u_lo, u_hi)


class TRKTOTrainer(TRDPOTrainer):
    """TR-KTO on a Hugging Face causal LM (config.trainer must be "kto").

    train_dataset / eval_dataset: TRL's unpaired rows (prompt, completion, label: text or message lists, with
    optional tools / chat_template_kwargs), or preference pairs, which are unpaired as TRL does. Batches hold
    per_device_train_batch_size rows (>= 2: the KL estimate needs another row's completion). With
    sync_ref_model=False it is KTO against a frozen reference, TRL's KTOTrainer; metrics are TRL's KTO names.
    evaluate(): eval_loss and the same metrics on the eval rows (KL rows paired in per_device_train_batch_size
    blocks over the eval set, as TRL pairs them), plus the exact per-token KL to the reference / initial model
    with eval_kl.
    """

    kind = "kto"
    metric_names = KTO_METRICS
    progress_desc = "TR-KTO"

    def __init__(self, model, tokenizer, train_dataset, config: TRDPOConfig, ref_model=None, eval_dataset=None, *,
                 init_model=None):
        if isinstance(config, TRDPOConfig) and config.per_device_train_batch_size < 2:
            raise ValueError("per_device_train_batch_size must be >= 2 for KTO: the KL estimate pairs each row's "
                             "prompt with another row's completion of the same batch (TRL requires it too)")
        from .training.lora import lora_requested

        if isinstance(config, TRDPOConfig) and lora_requested(model, config):
            # untested: KTO's KL rows and reference passes through the adapter views are not proven against the
            # formula, so the combination is refused rather than run unchecked
            raise ValueError(f"LoRA (lora_r={config.lora_r}, or a PeftModel) with trainer='kto' is not supported yet: "
                             "train TR-KTO without LoRA (lora_r=0)")
        super().__init__(model, tokenizer, train_dataset, config, ref_model=ref_model, eval_dataset=eval_dataset,
                         init_model=init_model)
        self.collator = UnpairedCollator(tokenizer.pad_token_id, config.max_length)
        self.loss_fn = KTOLoss(beta=config.beta, desirable_weight=config.desirable_weight,
                               undesirable_weight=config.undesirable_weight, ignore_index=self.collator.ignore_index,
                               token_stats=config.log_token_stats)
        self._eval_kl_sources = kl_partners(len(self.eval_pairs), config.per_device_train_batch_size)
        if self.train_pairs and self.is_main:
            _warn_weights(self.train_pairs, config.desirable_weight, config.undesirable_weight)

    @property
    def step_metric_names(self) -> tuple:
        """KTO_METRICS, plus TRL's KTO `entropy` with config.log_token_stats (TRL's KTOTrainer logs no
        mean_token_accuracy)."""
        return self.metric_names + (("entropy",) if self.loss_fn.token_stats else ())

    def _tokenize(self, dataset) -> list[TokenizedExample]:
        if dataset is None:
            return []
        c = self.config
        return tokenize_unpaired_dataset(dataset, self.tokenizer, max_length=c.max_length,
                                         max_prompt_length=c.max_prompt_length, truncation_mode=c.truncation_mode)

    def _step_rows(self, step: int) -> list[int]:
        """train_sampling_strategy sequential/auto (TRL's KTOConfig default): global batch `step` is the next
        rows in dataset order, every epoch the same order (an incomplete last global batch is dropped, as the
        loop does). With the loop's micro-batch split (rank r's micro-batch a of step s is per-device block
        (s·accum + a)·world + r, as accelerate shards a sequential loader) each micro-batch is one of TRL's
        per_device_train_batch_size blocks, so rotating inside it gives TRL's fixed KL partners. random: the
        loop's per-epoch permutation, KL partners rotated inside each shuffled micro-batch."""
        if self.config.train_sampling_strategy == "random":
            return TRDPOTrainer._step_rows(self, step)
        G = self.global_batch_size
        batch = step % self.steps_per_epoch
        return list(range(batch * G, (batch + 1) * G))

    def _row_tokens(self, example: TokenizedExample) -> int:
        # TRL counts the rows' attention_mask only (not the KL rows')
        return len(example.prompt) + len(example.completion)

    def _batch(self, examples, kl_sources=None) -> dict[str, torch.Tensor]:
        # kl_sources None: the batch rotated by one (TRL's pairing within a batch)
        return {k: v.to(self.device) for k, v in self.collator(examples, kl_sources).items()}

    def _gather_kl(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def _loss(self, batch, policy_module):
        return self._kto(batch, *self._hiddens(batch, policy_module))

    def _hiddens(self, batch, policy_module):
        """(policy hidden of the rows, policy hidden of the KL rows (no grad), reference hidden of both [2B])."""
        with self._autocast():
            hidden = policy_module(batch["input_ids"], batch["attention_mask"])
            with torch.no_grad():  # z is a constant of the loss: the policy's KL rows need no graph
                kl_hidden = self.policy(batch["kl_input_ids"], batch["kl_attention_mask"])
            # the reference sees the rows and their KL rows in one forward (same padded width)
            both = {"input_ids": torch.cat([batch["input_ids"], batch["kl_input_ids"]]),
                    "attention_mask": torch.cat([batch["attention_mask"], batch["kl_attention_mask"]])}
            ref_hidden = self._ref_hidden(self.ref_model, both)
        return hidden, kl_hidden, ref_hidden

    def _all_reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums

    def _kto(self, batch, hidden, kl_hidden, ref_hidden, reduce_sums=None):
        B = batch["input_ids"].shape[0]
        head, ref_head = self.policy.head, self.ref_head
        policy_kl, ref_kl = self.loss_fn.kl_logps(kl_hidden, head.weight, batch["kl_labels"], ref_hidden[B:],
                                                  ref_head.weight, policy_bias=head.bias, ref_bias=ref_head.bias)
        if self.world_size > 1 and self.model.training:  # TRL averages z over processes (equal rows per rank)
            policy_kl, ref_kl = self._gather_kl(policy_kl), self._gather_kl(ref_kl)
            # and divides the metrics' class sums by the global class counts: every rank logs the same value
            reduce_sums = self._all_reduce_sums
        loss, metrics = self.loss_fn(hidden, head.weight, batch["labels"], ref_hidden[:B], ref_head.weight,
                                     batch["desirable"], policy_kl, ref_kl, policy_bias=head.bias,
                                     ref_bias=ref_head.bias, reduce_sums=reduce_sums)
        if "entropy" in metrics and self.world_size > 1 and self.model.training:
            # TRL: Σ entropy and Σ tokens gathered over ranks, then divided (a token-weighted mean per micro-batch)
            tokens = (batch["labels"] != self.collator.ignore_index).sum().float()
            sums = torch.stack([metrics["entropy"] * tokens, tokens])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            metrics["entropy"] = sums[0] / sums[1].clamp(min=1.0)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval_loss (mean over rows) and TRL's KTO metrics (mean over eval batches of those measured), plus, with
        eval_kl, the exact per-token KL(policy || reference) and KL(policy || initial) over completion tokens.
        Under DDP each rank's batches use their own z (ranks may hold different numbers of eval batches, so no
        collective runs per batch); eval batch j of all ranks is one global batch whose class sums and counts are
        all-reduced at the end and divided once (as TRL gathers them before dividing)."""
        if not self.eval_pairs:
            raise ValueError("evaluate() needs an eval_dataset")
        c = self.config
        was_training = self.model.training
        self.model.eval()
        Be, S = c.per_device_eval_batch_size, len(KTO_SUMS)
        mine = list(range(self.rank, len(self.eval_pairs), self.world_size))
        # eval batch j of every rank is one global batch (as TRL's distributed eval steps): its class sums are
        # kept apart and reduced once at the end, then divided per global batch, as TRL gathers before dividing
        n_batches = -(-len(range(0, len(self.eval_pairs), self.world_size)) // Be)  # rank 0 holds the most rows
        batch_sums = torch.zeros(n_batches, S, dtype=torch.float64, device=self.device)
        ent_sums = torch.zeros(n_batches, 2, dtype=torch.float64, device=self.device)  # Σ entropy·tokens, tokens
        # [loss·rows, rows, kl sum, kl count, kl_ref, kl_init, tokens]
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        for j, start in enumerate(range(0, len(mine), Be)):
            idx = mine[start:start + Be]
            batch = self._batch([self.eval_pairs[i] for i in idx],
                                [self.eval_pairs[self._eval_kl_sources[i]] for i in idx])
            hidden, kl_hidden, ref_hidden = self._hiddens(batch, self.policy)
            captured = []
            loss, metrics = self._kto(batch, hidden, kl_hidden, ref_hidden,
                                      reduce_sums=lambda v: captured.append(v) or v)
            batch_sums[j] += captured[0].double()
            if "entropy" in metrics:
                tokens = int((batch["labels"] != self.collator.ignore_index).sum())
                ent_sums[j] += torch.tensor([float(metrics["entropy"]) * tokens, tokens], dtype=torch.float64,
                                            device=self.device)
            sums[0] += loss.double() * len(idx)
            sums[1] += len(idx)
            sums[2] += metrics["kl"].double()  # each rank's z of its batch (no collective per batch)
            sums[3] += 1
            if c.eval_kl:
                mask = batch["labels"] != self.collator.ignore_index
                h = hidden[mask]
                sums[-3] += kl_sum(h, self.policy.head, ref_hidden[:len(idx)][mask], self.ref_head,
                                   c.kl_chunk_tokens)
                if self.init_model is not None:
                    with self._autocast():
                        init_hidden = self._ref_hidden(self.init_model, batch)
                    sums[-2] += kl_sum(h, self.policy.head, init_hidden[mask], self.init_model.get_output_embeddings(),
                                       c.kl_chunk_tokens)
                sums[-1] += int(mask.sum())
        if self.world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(batch_sums, op=dist.ReduceOp.SUM)
        per_batch = kto_metrics_from_sums(torch.zeros(n_batches), batch_sums.float())
        s = sums.tolist()
        record = {"step": self.global_step, "eval_loss": s[0] / max(s[1], 1.0)}
        for k in self.metric_names:  # the mean over global batches of those that measured k (TRL's log)
            v = torch.tensor([s[2] / s[3]]) if k == "kl" else per_batch[k].double().cpu()
            present = v[~v.isnan()]
            if present.numel():
                record[f"eval_{k}"] = float(present.mean())
        if "entropy" in self.step_metric_names:  # per global batch: gathered sums / gathered tokens (TRL's)
            if self.world_size > 1:
                dist.all_reduce(ent_sums, op=dist.ReduceOp.SUM)
            measured = ent_sums[ent_sums[:, 1] > 0]
            if measured.numel():
                record["eval_entropy"] = float((measured[:, 0] / measured[:, 1]).mean())
        if c.eval_kl:
            record["eval_kl/ref"] = s[-3] / max(s[-1], 1.0)
            if self.init_model is not None:
                record["eval_kl/init"] = s[-2] / max(s[-1], 1.0)
        record["eval_rows"] = int(s[1])
        record["ref_updates"] = self.ref_updates
        if was_training:
            self.model.train()
        return record
