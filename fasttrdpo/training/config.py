"""TRDPOConfig: the settings of a training run (defaults follow TRL / the TR-DPO paper)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..loss.preference import LOSS_TYPES, check_loss_config
from .schedule import scheduler_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class TRDPOConfig:
    """Training configuration. Defaults follow TRL / the TR-DPO paper (the CLI demo overrides some)."""

    output_dir: str = "outputs/fasttrdpo"  # outputs/ is git-ignored
    overwrite_output_dir: bool = False  # a new run may replace another run's outputs in output_dir
    run_name: str | None = None  # a label recorded with the run id in every checkpoint
    # loss: any of fasttrdpo.loss.LOSS_TYPES (TRL 1.16's), or a list summed with loss_weights (RPO: sigmoid, sft)
    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    label_smoothing: float | list[float] = 0.0  # one value, or one per loss_type
    loss_weights: list[float] | None = None  # one per loss_type; None = 1.0 each
    discopop_tau: float = 0.05
    # reference updates (TR-DPO): every tau optimizer steps, ref <- ref + alpha * (policy - ref)
    sync_ref_model: bool = True
    alpha: float = 0.6
    tau: int = 512
    ref_dtype: str | None = None  # "bfloat16" keeps the reference (and the initial model) in bf16
    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"  # any transformers.get_scheduler name (TRL's lr_scheduler_type)
    lr_scheduler_kwargs: dict | None = None  # scheduler_specific_kwargs of get_scheduler (e.g. min_lr_rate)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int = 4  # pairs per rank per micro-batch
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    max_grad_norm: float = 1.0  # <= 0: no clipping
    bf16: bool = False  # autocast to bf16, fp32 master weights
    disable_dropout: bool = True  # as TRL: dropout off in policy, reference and initial model
    gradient_checkpointing: bool = False
    seed: int = 42
    data_seed: int | None = None  # data order; defaults to seed
    # data
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_prompt_end"  # or "keep_start" (TRL's); see fasttrdpo.data.tokenize_pair
    # records
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate at the end only
    save_steps: int = 500  # 0: save at the end only
    save_total_limit: int | None = 2
    eval_kl: bool = True  # exact full-vocabulary KL(policy || ref) and KL(policy || initial) at eval
    kl_chunk_tokens: int = 1024
    plot: bool = True
    disable_tqdm: bool = False
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    device: str = "auto"
    # FSDP2 under torchrun: policy, reference and initial model sharded (fasttrdpo.training.fsdp)
    fsdp: bool = False

    def __post_init__(self):
        # lists as lists (a tuple from Python code, a list from JSON: the same config, the same record)
        for name in ("loss_type", "label_smoothing", "loss_weights"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        try:  # the loss settings as TRDPOLoss checks them, before anything else runs
            check_loss_config(self.beta, self.loss_type, self.label_smoothing, loss_weights=self.loss_weights,
                              discopop_tau=self.discopop_tau, accept=LOSS_TYPES)
        except (ValueError, TypeError) as e:
            raise ValueError(f"TRDPOConfig: {e}") from None
        checks = [
            (self.beta > 0, "beta must be > 0"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.tau >= 1, "tau must be >= 1"),
            (self.ref_dtype is None or self.ref_dtype in DTYPES,
             f"ref_dtype must be None or one of {sorted(DTYPES)}"),
            (self.learning_rate >= 0, "learning_rate must be >= 0"),
            (self.lr_scheduler_type in scheduler_names(),
             f"lr_scheduler_type must be one of {', '.join(scheduler_names())}"),
            (self.lr_scheduler_kwargs is None or isinstance(self.lr_scheduler_kwargs, dict),
             "lr_scheduler_kwargs must be a dict (JSON object) or None"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio <= 1, "warmup must be >= 0"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps > 0 or num_train_epochs > 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.truncation_mode in ("keep_prompt_end", "keep_start"),
             "truncation_mode must be 'keep_prompt_end' or 'keep_start'"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
            (self.eval_steps >= 0 and self.save_steps >= 0, "eval_steps and save_steps must be >= 0"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1"),
            (self.kl_chunk_tokens >= 1, "kl_chunk_tokens must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TRDPOConfig: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
