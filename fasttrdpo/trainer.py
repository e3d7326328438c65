"""The thin TR-DPO trainer: composes `fasttrdpo.loss.TRDPOLoss` and `fasttrdpo.RefModelUpdater`.

Per optimizer step: the policy backbone (never the LM head) gives hidden states, the reference backbone
runs under no_grad, and `TRDPOLoss` takes both with the lm_head weights -> logits are never formed in
training. Every tau optimizer steps the updater blends the policy into the reference. Evaluation adds
the exact full-vocabulary KL of the policy to the reference and to the initial model (chunked logits;
evaluation only). Checkpoints are atomic (temporary directory + rename); DDP via torchrun.

This module is the loop; each other concern has a module of its own under `fasttrdpo.training`:
config (TRDPOConfig), model_parts (backbone/head), checkpoint (saves, rotation, RNG, resume),
distributed (DDP), evaluate (held-out metrics, KL), plot.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch
import torch.distributed as dist

from .data import PreferenceCollator, TokenizedPair, tokenize_dataset
from .training import checkpoint as _ckpt
from .training import distributed as _dist
from .training import final as _final
from .training import fsdp as _fsdp
from .training import lora as _lora
from .training.checkpoint import CHECKPOINT_RE, find_latest_checkpoint, load_weights, save_weights
from .training.config import DTYPES as _DTYPES
from .training.config import TRDPOConfig
from .training.evaluate import TRL_METRICS
from .training.evaluate import evaluate as _evaluate
from .training.model_parts import HiddenStates as _HiddenStates
from .training.model_parts import causal_lm_parts, disable_dropout
from .training.model_parts import frozen_copy as _frozen_copy
from .training import packing as _packing
from .training.output_dir import OutputDirError, OutputDirLock, check_new_run
from .training.plot import plot_metrics
from .training.reporting import Reporter
from .training.schedule import METRIC_DRIVEN, Schedule

__all__ = ["TRDPOConfig", "TRDPOTrainer", "TRL_METRICS", "CHECKPOINT_RE", "OutputDirError", "causal_lm_parts",
           "find_latest_checkpoint", "load_weights", "save_weights", "plot_metrics"]

_log = logging.getLogger("fasttrdpo")


class TRDPOTrainer:
    """TR-DPO on a Hugging Face causal LM. `train()` runs to max_steps (or the epochs) and returns the
    final metrics; `evaluate()` returns held-out reward accuracy/margins and the KL figures.

    model: the policy (its weights are trained in place). ref_model: the reference; by default a copy of
    the policy (in `config.ref_dtype`). train_dataset / eval_dataset: `datasets.Dataset` (or lists of
    dicts) with prompt, chosen, rejected strings. init_model: the model KL(policy || initial) is measured
    against at evaluation (default: a copy of `model` as given; False: do not report it). Under torchrun
    (WORLD_SIZE > 1) it runs DDP.

    Subclasses that train another objective on the same loop (`fasttrdpo.kto_trainer.TRKTOTrainer`) set `kind`
    (the `config.trainer` they accept), `metric_names` (what `_loss` returns beside the loss; a NaN value means
    "not measured in this micro-batch" and is left out of the average, as TRL leaves it out of its lists) and
    override `_tokenize`, `_batch`, `_loss`, `_row_tokens` (what TRL's num_tokens counts of a row) and `evaluate`.
    """

    kind = "dpo"
    metric_names = TRL_METRICS
    progress_desc = "TR-DPO"

    def __init__(self, model, tokenizer, train_dataset, config: TRDPOConfig, ref_model=None,
                 eval_dataset=None, *, init_model=None):
        from .loss import TRDPOLoss
        from .ref_update import RefModelUpdater

        if not isinstance(config, TRDPOConfig):
            raise TypeError(f"config must be a TRDPOConfig, got {type(config).__name__}")
        if config.trainer != self.kind:
            raise ValueError(f"config.trainer={config.trainer!r} but {type(self).__name__} trains "
                             f"trainer={self.kind!r}" + (" (TR-KTO: fasttrdpo.trainer.TRKTOTrainer)"
                                                         if config.trainer == "kto" else ""))
        if train_dataset is None and eval_dataset is None:
            raise ValueError("give a train_dataset (to train) or an eval_dataset (to evaluate)")
        causal_lm_parts(model)  # a causal LM with a plain lm_head, checked before anything moves
        if ref_model is not None:
            causal_lm_parts(ref_model)
        self.config = config
        self.tokenizer = tokenizer
        if _lora.lora_requested(model, config) and _dist.requested_world_size() > 1:
            # untested: the adapter views, the merged reference and their broadcast under DDP are not proven equal
            # to one process, so the combination is refused rather than run unchecked
            raise ValueError(f"LoRA (lora_r={config.lora_r}) under distributed training (world size "
                             f"{_dist.requested_world_size()}) is not supported yet: run LoRA in one process")
        self.world_size, self.rank, self._owns_process_group = _dist.init_distributed(config.device)
        _fsdp.check_fsdp_config(config, self.world_size)
        self.device = _dist.pick_device(config.device)
        self.ref_dtype = _DTYPES[config.ref_dtype] if config.ref_dtype else None

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.collator = PreferenceCollator(tokenizer.pad_token_id)
        self.train_pairs = self._tokenize(train_dataset)
        self.eval_pairs = self._tokenize(eval_dataset)
        self.global_step = 0
        self.total_steps = self._total_steps() if self.train_pairs else 0  # raises on too little data

        # LoRA (fasttrdpo.training.lora): the policy becomes a PeftModel; its reference is the base, a "ref"
        # adapter or a merged full-weight copy
        self.lora = _lora.LoraSetup(model, config) if _lora.lora_requested(model, config) else None
        if self.lora is None:
            _lora.check_no_lora(config)
        else:
            if config.fsdp:  # no test proves adapters under fully_shard yet
                raise ValueError("fsdp with LoRA is not supported yet: train LoRA with DDP (torchrun without --fsdp)")
            model = self.lora.model
        # under FSDP the models stay where they are until fully_shard moves each unit's shards
        self.model = model if config.fsdp else model.to(self.device)
        if config.disable_dropout:  # before the copies below: reference and initial model inherit it
            disable_dropout(self.model)
            if ref_model is not None:
                disable_dropout(ref_model)
            if init_model not in (None, False):
                disable_dropout(init_model)
        if config.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # the transformers >= 5 name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.policy = _HiddenStates(self.model)
        place = (lambda m: m) if config.fsdp else (lambda m: m.to(self.device))
        if self.lora is not None:
            self.ref_model = self.lora.reference(_frozen_copy, ref_model, self.ref_dtype, self.device)
        else:
            self.ref_model = (_frozen_copy(self.model, self.ref_dtype) if ref_model is None
                              else _frozen_copy(place(ref_model), self.ref_dtype))
        self.ref_backbone, self.ref_head = causal_lm_parts(self.ref_model)
        # the initial policy, kept only to report KL(policy || initial) at evaluation
        if init_model is False or not (config.eval_kl and self.eval_pairs):
            self.init_model = None
        elif init_model is None:
            self.init_model = self.lora.initial() if self.lora is not None else _frozen_copy(self.model, self.ref_dtype)
        else:
            self.init_model = _frozen_copy(place(init_model), self.ref_dtype)
        self.sharded = None  # fasttrdpo.training.fsdp.ShardedModels under FSDP2
        if config.fsdp:
            self.sharded = _fsdp.ShardedModels(self)
            self.policy_ddp = self.sharded
        elif self.world_size > 1:
            _dist.broadcast_frozen(self.ref_model, self.init_model)
            self.policy_ddp = _dist.wrap_ddp(self.policy, self.device)
        else:
            self.policy_ddp = self.policy

        self.loss_fn = TRDPOLoss(beta=config.beta, loss_type=config.loss_type,
                                 label_smoothing=config.label_smoothing, loss_weights=config.loss_weights,
                                 discopop_tau=config.discopop_tau, ignore_index=self.collator.ignore_index,
                                 token_stats=config.log_token_stats)
        # padding-free batches: the probe refuses a model whose packed log-probs differ from its padded ones
        self.packer = None
        if config.packing or config.share_prompt:
            if self.lora is not None:  # no test proves the adapter switching inside packed batches yet
                raise ValueError("packing / share_prompt with LoRA is not supported yet: train LoRA with padded "
                                 "batches (packing=False, share_prompt=False)")
            self.packer = _packing.Packer(self.model, config, pad_token_id=tokenizer.pad_token_id)
            for m in (self.model, self.ref_model):
                _packing.probe(m, share_prompt=config.share_prompt, pad_token_id=tokenizer.pad_token_id,
                               device=self.device)
        if self.lora is not None:
            self.updater = self.lora.updater(self.ref_model)
        else:
            self.updater = (RefModelUpdater(policy=self.model, ref=self.ref_model, alpha=config.alpha, tau=config.tau)
                            if config.sync_ref_model else None)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_epsilon, weight_decay=config.weight_decay)
        if config.lr_scheduler_type in METRIC_DRIVEN:
            if self.train_pairs and not (self.eval_pairs and config.eval_steps):
                raise ValueError(f"lr_scheduler_type={config.lr_scheduler_type!r} follows the evaluation loss: it "
                                 "needs eval_steps > 0 and an eval_dataset")
            from transformers import get_scheduler

            self.schedule = None
            self.scheduler = get_scheduler(config.lr_scheduler_type, self.optimizer,
                                           scheduler_specific_kwargs=dict(config.lr_scheduler_kwargs or {}))
        else:
            self.schedule = Schedule(config, max(self.total_steps, 1))
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.schedule(step))
        self.last_lr: float | None = None  # the learning rate of the last optimizer step (saved: resume continues it)
        self.num_tokens = 0  # TRL's num_tokens: non-padding tokens of every rank's training rows so far (saved)
        self.history: list[dict] = []
        self.rank_fingerprints: list[dict] | None = None
        self.rank_state_bytes: list[dict] | None = None  # set at the end of train() (gather_state_bytes)
        self.is_main = self.rank == 0
        self.metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
        self.run_id: str | None = None  # set by train(): new uuid, or the resumed checkpoint's
        self.run_info: dict = {}  # free-form description of the run saved with each checkpoint (the CLI's data args)
        self.resumed_from: str | None = None
        self._window: list[torch.Tensor] = []  # per-step metric vectors since the last training record
        self._window_seconds = 0.0  # time spent on them (before the current stretch)
        self._lock: OutputDirLock | None = None
        # report_to's targets (tensorboard, wandb): a missing package raises here, before anything runs
        self.reporter = Reporter(config.report_to, config.output_dir)

    @property
    def step_metric_names(self) -> tuple:
        """metric_names, plus TRL's entropy and mean_token_accuracy when the loss computes them (TRDPOLoss with
        token_stats, from config.log_token_stats): the order of the logged per-step vector."""
        stats = getattr(self.loss_fn, "token_stats", False)
        return self.metric_names + (("entropy", "mean_token_accuracy") if stats else ())

    # --- set-up helpers ------------------------------------------------------------------------------


    def _tokenize(self, dataset) -> list[TokenizedPair]:
        if dataset is None:
            return []
        if isinstance(dataset, list):
            import datasets

            dataset = datasets.Dataset.from_list(dataset)
        return tokenize_dataset(dataset, self.tokenizer, max_length=self.config.max_length,
                                max_prompt_length=self.config.max_prompt_length,
                                truncation_mode=self.config.truncation_mode)

    @property
    def ref_updates(self) -> int:
        return self.updater.num_updates if self.updater is not None else 0

    @property
    def global_batch_size(self) -> int:
        c = self.config
        return c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_pairs) // self.global_batch_size

    def _total_steps(self) -> int:
        if self.steps_per_epoch < 1:
            raise ValueError(f"train_dataset has {len(self.train_pairs)} pairs, fewer than one global batch "
                             f"({self.global_batch_size} = per-device batch x accumulation x world size)")
        if self.config.max_steps > 0:
            return self.config.max_steps
        return max(1, math.ceil(self.config.num_train_epochs * self.steps_per_epoch))

    # --- data order: a function of the step only (what makes resume exact) --------------------------

    def _step_rows(self, step: int) -> list[int]:
        """The pair indices of optimizer step `step`'s global batch (every rank, every micro-batch)."""
        c = self.config
        seed = c.seed if c.data_seed is None else c.data_seed
        epoch, batch = divmod(step, self.steps_per_epoch)
        cache = self.__dict__.setdefault("_epoch_order", {})  # one permutation per epoch, drawn once
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(len(self.train_pairs), generator=torch.Generator().manual_seed(seed + epoch))
        G = self.global_batch_size
        return cache[epoch][batch * G:(batch + 1) * G].tolist()

    def _step_indices(self, step: int) -> list[list[int]]:
        """The pair indices this rank uses at optimizer step `step`: one list per micro-batch."""
        chunk, B, W = self._step_rows(step), self.config.per_device_train_batch_size, self.world_size
        return [chunk[(a * W + self.rank) * B:(a * W + self.rank + 1) * B]
                for a in range(self.config.gradient_accumulation_steps)]

    def _row_tokens(self, pair: TokenizedPair) -> int:
        """The non-padding tokens the collator feeds for one training pair (its rows' attention_mask sum)."""
        return 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)

    def _step_tokens(self, step: int) -> int:
        """TRL's num_tokens increment of one optimizer step: the attention_mask sum of its global batch (all ranks,
        as TRL gathers it), known on every rank from the data order: no collective, no device sync."""
        return sum(self._row_tokens(self.train_pairs[i]) for i in self._step_rows(step))

    # --- forward --------------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _batch(self, pairs: list[TokenizedPair], *, packed: bool = False) -> dict[str, torch.Tensor]:
        if packed:  # training with packing / share_prompt (fasttrdpo.training.packing); evaluation stays padded
            return self.packer(pairs, self.device)
        return {k: v.to(self.device) for k, v in self.collator(pairs).items()}

    def _ref_hidden(self, module, batch):
        """Hidden states of a frozen model (the reference, or the initial model) without autograd."""
        backbone = self.ref_backbone if module is self.ref_model else causal_lm_parts(module)[0]
        with torch.no_grad():
            out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch.get("position_ids"), use_cache=False)
        return out.last_hidden_state

    def _loss(self, batch, policy_module):
        if self.sharded is not None:  # the fused loss inside the policy's FSDP forward
            return self.sharded.loss(batch)
        # the backbones run under autocast (bf16 activations); the loss does its own fp32 math on them
        with self._autocast():
            hidden = policy_module(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
            ref_hidden = self._ref_hidden(self.ref_model, batch)
        if _packing.is_packed(batch):  # valid tokens only, through trdpo_loss_from_tokens
            return _packing.packed_loss(batch, hidden, self.policy.head, ref_hidden, self.ref_head, self.packer.loss_kwargs)
        return self.loss_fn(hidden, self.policy.head.weight, batch["labels"], ref_hidden, self.ref_head.weight,
                            policy_bias=self.policy.head.bias, ref_bias=self.ref_head.bias)

    # --- training -------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train to total_steps (resuming first if config.resume_from_checkpoint) and return the final
        metrics: the final evaluation's record when there is an eval set, else the last training record.
        The output directory's rules (lock, run id, refusal of another run's checkpoints) are in
        `fasttrdpo.training.output_dir`."""
        if not self.train_pairs:
            raise ValueError("train() needs a train_dataset")
        try:
            self._claim_output_dir()
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log lines (resume notices, warnings) go through tqdm.write too: they never cut the progress bar
            with logging_redirect_tqdm(loggers=[_log]):
                return self._train()
        finally:
            self.reporter.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _claim_output_dir(self) -> None:
        """Rank 0 takes the output directory's lock and decides the run id (a new run refuses a directory
        holding another run's checkpoints); every rank gets the outcome, so all raise together."""
        import uuid

        c = self.config
        outcome: dict = {}
        if self.is_main:
            try:
                self._lock = OutputDirLock(c.output_dir).acquire()
                if c.resume_from_checkpoint:
                    path = self._resolve_resume(c.resume_from_checkpoint)
                    outcome["resume"] = path
                    outcome["run_id"] = _ckpt.read_state_json(path).get("run_id") or uuid.uuid4().hex
                else:
                    for notice in check_new_run(c.output_dir, overwrite=c.overwrite_output_dir):
                        _log.warning(notice)
                    outcome["run_id"] = uuid.uuid4().hex
            except (OutputDirError, FileNotFoundError) as e:
                outcome["error"] = e
        outcome = _dist.broadcast_object(outcome, self.world_size)
        if "error" in outcome:
            raise outcome["error"]
        self.run_id = outcome["run_id"]
        self.resumed_from = outcome.get("resume")

    def _resolve_resume(self, path: str) -> str:
        if path == "latest":
            found = find_latest_checkpoint(self.config.output_dir)
            if found is None:
                raise FileNotFoundError(f"resume 'latest': no checkpoint in {self.config.output_dir}")
            return found
        if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
            raise FileNotFoundError(f"{path} is not a fasttrdpo checkpoint (no trainer_state.pt)")
        return path

    def _train(self) -> dict:
        c = self.config
        if self.is_main:
            os.makedirs(c.output_dir, exist_ok=True)
        if self.resumed_from:
            self.load_checkpoint(self.resumed_from)
        else:
            _ckpt.seed_all(c.seed + self.rank)
            if self.is_main:
                open(self.metrics_path, "w").close()
        if self.is_main:
            self.reporter.open(self.run_id, run_name=c.run_name, config=c.to_dict())
        if self.global_step >= self.total_steps:
            return self._already_finished()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=self.progress_desc, dynamic_ncols=True,
                   disable=not self.is_main or c.disable_tqdm)
        if self.eval_pairs and c.eval_steps and self.global_step == 0:
            self._log(self.evaluate())  # the starting point of the eval curves (KL = 0)
        t_window = time.perf_counter() - self._window_seconds
        last_saved = self.global_step if self.resumed_from else -1
        accum = c.gradient_accumulation_steps
        while self.global_step < self.total_steps:
            micro_batches = self._step_indices(self.global_step)
            step_sum = None
            for a, idx in enumerate(micro_batches):
                pairs = [self.train_pairs[i] for i in idx]
                batch = self._batch(pairs) if self.packer is None else self._batch(pairs, packed=True)
                sync = a == accum - 1 or self.world_size == 1
                ctx = contextlib.nullcontext() if sync else self.policy_ddp.no_sync()
                with ctx:
                    loss, metrics = self._loss(batch, self.policy_ddp)
                    (loss / accum).backward()
                vec = torch.stack([loss.detach().float()] + [metrics[k].detach().float().reshape(())
                                                             for k in self.step_metric_names])
                # per value: the sum over micro-batches and how many measured it (NaN = not measured)
                vec = torch.stack([vec.nan_to_num(0.0), (~vec.isnan()).float()])
                step_sum = vec if step_sum is None else step_sum + vec
            if c.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            grad_norm = _fsdp.full_tensor(grad_norm)  # a DTensor under FSDP
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.schedule is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.num_tokens += self._step_tokens(self.global_step)
            self.global_step += 1
            self.last_lr = lr
            if self.updater is not None:
                self.updater.step(self.global_step)  # blends iff global_step % tau == 0
            grad_norm = grad_norm.detach().float().reshape(1, 1).to(step_sum.device)
            self._window.append(torch.cat([step_sum, torch.cat([grad_norm, grad_norm.new_ones(1, 1)])], 1))
            bar.update(1)

            done = self.global_step >= self.total_steps
            if self.global_step % c.logging_steps == 0 or done:
                record = self._reduce_window(self._window, lr, time.perf_counter() - t_window)
                self._window, t_window = [], time.perf_counter()
                self._log(record)
                shown = {"acc": record["rewards/accuracies"]} if "rewards/accuracies" in record else {}
                bar.set_postfix(loss=f"{record['loss']:.4f}", **{k: f"{v:.3f}" for k, v in shown.items()},
                                refs=self.ref_updates)
            if self.eval_pairs and c.eval_steps and self.global_step % c.eval_steps == 0 and not done:
                self._log(self._evaluate_and_step_scheduler())
            if c.save_steps and self.global_step % c.save_steps == 0:
                self._window_seconds = time.perf_counter() - t_window
                self.save_checkpoint()
                last_saved = self.global_step
        bar.close()
        if self.world_size > 1:
            self.check_ranks_agree()
        self.rank_state_bytes = self.gather_state_bytes()
        final = self._last_train_record()
        if self.eval_pairs:
            final = self.evaluate()
            self._log(final)
        if last_saved != self.global_step:
            self._window_seconds = 0.0
            self.save_checkpoint()
        self.save_final()
        if self.is_main and c.plot:
            self.plot()
        return final

    def _evaluate_and_step_scheduler(self) -> dict:
        record = self.evaluate()
        if self.schedule is None:  # reduce_lr_on_plateau / greedy follow the evaluation loss
            self.scheduler.step(record["eval_loss"])
        return record

    def _last_train_record(self) -> dict:
        return next((dict(r) for r in reversed(self.history) if "loss" in r), {})

    def _already_finished(self) -> dict:
        """Resumed at (or past) the last step: nothing to train, nothing logged or saved twice."""
        _log.warning("the run is already at step %d of %d: nothing to train (a larger --max-steps continues it)",
                     self.global_step, self.total_steps)
        if self.world_size > 1:
            self.check_ranks_agree()
        if not _final.is_current(self):  # a run killed between its last checkpoint and final/
            self.save_final()
        done = [r for r in self.history if "eval_loss" in r and r["step"] == self.global_step]
        if done:
            return dict(done[-1])
        if self.eval_pairs:
            final = self.evaluate()
            self._log(final)
            return final
        return self._last_train_record()

    def _reduce_window(self, window: list[torch.Tensor], lr: float, seconds: float) -> dict:
        # each step: [sums; counts] over its micro-batches of (loss, metrics..., grad_norm): the record averages
        # every measurement of the window (grad_norm: one per step, already global after DDP's all-reduce)
        # (a checkpoint written before this layout holds each step's means: one measurement each)
        window = [w if w.dim() == 2 else torch.stack([w, torch.ones_like(w)]) for w in window]
        total = torch.stack(window).sum(0)
        if self.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        values = (total[0] / total[1]).tolist()  # 0/0 = NaN: measured nowhere in the window, left out below
        record = {"step": self.global_step, "epoch": round(self.global_step / self.steps_per_epoch, 4),
                  "loss": values[0]}
        record.update({k: v for k, v in zip(self.step_metric_names, values[1:-1]) if not math.isnan(v)})
        record.update({"grad_norm": values[-1], "learning_rate": lr, "num_tokens": self.num_tokens,
                       "ref_updates": self.ref_updates,
                       "steps_per_second": round(len(window) / max(seconds, 1e-9), 3)})
        return record

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        from tqdm.auto import tqdm

        shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()}
        tqdm.write(json.dumps(shown))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.reporter.log(record)


    # --- evaluation (fasttrdpo.training.evaluate) -------------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out loss, rewards (accuracy, margins) and, with eval_kl, the exact per-token
        KL(policy || reference) and KL(policy || initial model) over the completion tokens, averaged
        over tokens. Logits for the KL are formed chunk by chunk (kl_chunk_tokens rows at a time)."""
        return _evaluate(self)

    # --- checkpoints (fasttrdpo.training.checkpoint) ----------------------------------------------------

    def save_checkpoint(self) -> str:
        """Write output_dir/checkpoint-<step> atomically (see fasttrdpo.training.checkpoint)."""
        return _ckpt.save_checkpoint(self)

    def save_final(self) -> str:
        """Write output_dir/final/ (save_pretrained format; see fasttrdpo.training.final)."""
        return _final.save_final(self)

    def load_checkpoint(self, path: str) -> None:
        """Restore policy, reference, optimizer, scheduler, updater, RNG and data position."""
        _ckpt.load_checkpoint(self, path)

    # --- ranks (fasttrdpo.training.distributed) ---------------------------------------------------------

    def fingerprints(self) -> dict[str, str]:
        """sha256 of the policy's and the reference's parameter bytes (to compare ranks or runs). Under
        FSDP: of the gathered weights, as computed by the last check_ranks_agree()."""
        if self.sharded is not None:
            return getattr(self, "_gathered_fingerprints", None) or {}
        return _dist.fingerprints(policy=self.model, reference=self.ref_model)

    def check_ranks_agree(self) -> list[dict]:
        """Under DDP: gather every rank's fingerprints; raise if the policy or the reference differ.
        Under FSDP: every rank hashes the gathered policy and reference; the hashes must agree."""
        if self.sharded is not None:
            self.rank_fingerprints = _fsdp.check_ranks_agree(self)
        else:
            self.rank_fingerprints = _dist.gather_and_compare(self.fingerprints(), self.world_size)
        return self.rank_fingerprints

    def gather_state_bytes(self) -> list[dict]:
        """Per rank: bytes of the policy's parameters (local shards), optimizer state and reference."""
        mine = _fsdp.local_state_bytes(self)
        if self.world_size == 1:
            return [mine]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def _barrier(self):
        _dist.barrier(self.world_size)

    # --- plot -----------------------------------------------------------------------------------------

    def plot(self, path: str | None = None) -> str | None:
        """PNG of the training curves (loss, reward accuracy, margins, KL). Needs matplotlib."""
        return plot_metrics(self.history, path or os.path.join(self.config.output_dir, "training_curves.png"))

    def close(self):
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


from .kto_trainer import TRKTOTrainer  # noqa: E402  (TR-KTO runs on the loop above)

__all__ += ["TRKTOTrainer"]
