"""TRDPOConfig: the settings of a training run (defaults follow TRL / the TR-DPO paper)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..loss.preference import LOSS_TYPES, check_loss_config
from .lora import check_config as check_lora_config
from .schedule import scheduler_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def option(default=dataclasses.MISSING, help: str = "", *, eval: str | None = None, **flag):
    """A TRDPOConfig field with its command-line description (read by fasttrdpo.config_flags, which builds
    `--field-name` from the annotation): `help` the flag's help text; `eval` None (`fasttrdpo train` only),
    "flag" (`fasttrdpo eval` takes the flag too) or "recorded" (`eval` takes the checkpoint's recorded value
    unless the flag is given); optional `flag` (another name), `aliases`, `const` (the value of the flag
    given alone), `choices` (of a str field), `metavar`. A mutable default: `default_factory=...` in flag."""
    factory = flag.pop("default_factory", dataclasses.MISSING)
    metadata = {"help": help, "eval": eval, **flag}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TRDPOConfig:
    """Training configuration. Defaults follow TRL / the TR-DPO paper (the CLI demo overrides some).

    Every field is a command-line flag of `fasttrdpo train` (and of `fasttrdpo eval` where its metadata says
    so) and a key of `--config FILE.json`, built from the annotation and `option(...)` metadata: a new
    field declared with `option(default, "help", eval=...)` gets its flag with no CLI edit."""

    output_dir: str = option("outputs/fasttrdpo", "where metrics.jsonl, checkpoints, the plot and final_metrics.json "
                             "go (outputs/ is git-ignored)")
    overwrite_output_dir: bool = option(False, "a new run may replace another run's outputs in output_dir")
    run_name: str | None = option(None, "a label recorded with the run id in every checkpoint")
    trainer: str = option("dpo", "dpo: TRDPOTrainer on pairs; kto: TRKTOTrainer (TR-KTO) on unpaired "
                          "prompt/completion/label rows (eval: the DPO or the KTO loss)", eval="recorded",
                          choices=("dpo", "kto"))
    # the loss: any of fasttrdpo.loss.LOSS_TYPES (TRL 1.16's), or a list summed with loss_weights (RPO: sigmoid, sft)
    beta: float = option(0.1, "the loss's beta (temperature of the implicit reward)", eval="recorded")
    loss_type: str | list[str] = option("sigmoid", "a loss type of fasttrdpo.loss.LOSS_TYPES, or a comma-separated "
                                        "list summed with loss_weights (RPO: sigmoid,sft)", eval="recorded",
                                        metavar="TYPE[,TYPE...]")
    label_smoothing: float | list[float] = option(0.0, "one value, or one per loss_type", eval="recorded")
    loss_weights: list[float] | None = option(None, "one weight per loss_type (none: 1.0 each)", eval="recorded")
    discopop_tau: float = option(0.05, "discopop's tau", eval="recorded")
    # KTO (trainer="kto"): TRL's weights of the desirable / undesirable rows' losses
    desirable_weight: float = option(1.0, "TR-KTO: weight of the desirable rows' losses (trainer kto only)",
                                     eval="recorded")
    undesirable_weight: float = option(1.0, "TR-KTO: weight of the undesirable rows' losses (trainer kto only)",
                                       eval="recorded")
    # reference updates (TR-DPO): every tau optimizer steps, ref <- ref + alpha * (policy - ref)
    sync_ref_model: bool = option(True, "update the reference every tau steps (TR-DPO); off: plain DPO")
    alpha: float = option(0.6, "reference update weight: ref <- ref + alpha * (policy - ref), in [0, 1]")
    tau: int = option(512, "optimizer steps between reference updates")
    ref_dtype: str | None = option(None, "dtype of the reference and initial model (bfloat16 halves their memory; "
                                   "none: the policy's)", eval="recorded", choices=tuple(DTYPES))
    # LoRA (peft; fasttrdpo.training.lora): lora_r > 0 trains an adapter, the base weights stay frozen
    lora_r: int = option(0, "LoRA rank (0: no LoRA, train the weights)")
    lora_alpha: float = option(32.0, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch (needs --no-disable-dropout)")
    lora_target_modules: list[str] | None = option(None, "modules that get an adapter, comma-separated (none: "
                                                   "peft's default for the architecture; all-linear)",
                                                   metavar="NAME[,NAME...]")
    lora_reference: str | None = option(None, "the reference with LoRA: base (adapters off, the default), adapter "
                                        "(a 'ref' adapter), merged (a full-weight copy; exact soft updates)",
                                        choices=("base", "adapter", "merged"))
    lora_soft: str = option("error", "factors: allow the approximate soft update (alpha < 1) of a reference "
                            "adapter's factors", choices=("error", "factors"))
    # the final model (output_dir/final/, save_pretrained format)
    save_reference: bool = option(False, "also write the reference to final/reference/")
    save_merged: bool = option(False, "LoRA: write final/ as full weights (adapter merged) instead of the adapter")
    # optimisation
    learning_rate: float = option(1e-6, "AdamW learning rate", aliases=("--lr",))
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    lr_scheduler_type: str = option("linear", "any transformers.get_scheduler name (TRL's lr_scheduler_type)")
    lr_scheduler_kwargs: dict | None = option(None, "the scheduler's scheduler_specific_kwargs as a JSON object, "
                                              "e.g. '{\"min_lr_rate\": 0.1}'")
    warmup_steps: int = option(0, "linear warmup steps (wins over warmup_ratio)")
    warmup_ratio: float = option(0.0, "warmup as a fraction of the optimizer steps")
    per_device_train_batch_size: int = option(4, "pairs (TR-KTO: rows) per rank per micro-batch; TR-KTO's evaluation "
                                              "pairs the KL rows in blocks of this many rows, as TRL does (eval: "
                                              "trainer kto only)", eval="recorded")
    per_device_eval_batch_size: int = option(8, "pairs per rank per evaluation batch", eval="flag")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(-1, "optimizer steps (> 0 overrides num_train_epochs)")
    num_train_epochs: float = option(1.0, "epochs over the training pairs when max_steps <= 0")
    max_grad_norm: float = option(1.0, "gradient clipping norm (<= 0: no clipping; the norm is still logged)")
    bf16: bool = option(False, "autocast to bf16 with fp32 master weights", eval="recorded")
    disable_dropout: bool = option(True, "dropout off in policy, reference and initial model (TRL's default)")
    gradient_checkpointing: bool = option(False, "activation checkpointing in the policy")
    seed: int = option(42, "model and RNG seed", eval="recorded")
    data_seed: int | None = option(None, "data order seed (none: seed)")
    train_sampling_strategy: str = option("auto", "training row order: random (a permutation per epoch), "
                                          "sequential (dataset order every epoch: TRL's KTOConfig default, which "
                                          "also fixes the KL partners in per-device-batch blocks; trainer kto "
                                          "only) or auto (sequential for kto, random for dpo)",
                                          choices=("auto", "random", "sequential"))
    # data
    max_length: int = option(512, "prompt + completion tokens kept", eval="recorded")
    max_prompt_length: int | None = option(None, "prompt tokens kept (none: no separate prompt limit)",
                                           eval="recorded")
    truncation_mode: str = option("keep_prompt_end", "which prompt tokens are kept (keep_start is TRL's); see "
                                  "fasttrdpo.data.tokenize_pair", eval="recorded",
                                  choices=("keep_prompt_end", "keep_start"))
    # padding-free training batches (fasttrdpo.training.packing); evaluation stays padded
    packing: bool = option(False, "pack the rows into bins of max_length tokens without padding (per-row "
                           "positions, attention kept inside rows)")
    share_prompt: bool = option(False, "run each pair as prompt + chosen + rejected once (rejected does not see "
                                "chosen; implies packing)")
    # records
    logging_steps: int = option(10, "optimizer steps between training records")
    eval_steps: int = option(0, "optimizer steps between evaluations (0: at the end only)")
    save_steps: int = option(500, "optimizer steps between checkpoints (0: at the end only)")
    save_total_limit: int | None = option(2, "checkpoints kept (none: all)")
    eval_kl: bool = option(True, "exact full-vocabulary KL(policy || ref) and KL(policy || initial) at evaluation",
                           eval="flag")
    kl_chunk_tokens: int = option(1024, "tokens whose logits are formed at a time for the evaluation KL", eval="flag")
    plot: bool = option(True, "write training_curves.png (needs matplotlib)")
    report_to: str | list[str] = option("none", "also send every record to tensorboard and/or wandb (comma-separated; "
                                        "none: metrics.jsonl only); see fasttrdpo.training.reporting",
                                        metavar="none|tensorboard|wandb[,...]")
    log_token_stats: bool = option(True, "log TRL's entropy and mean_token_accuracy of the policy, computed in the "
                                   "fused loss without logits (trainer kto: TRL's KTO entropy only, one more "
                                   "no-grad policy head pass)")
    disable_tqdm: bool = option(False, "no progress bar")
    resume_from_checkpoint: str | None = option(None, "resume from 'latest' or a checkpoint directory",
                                                flag="--resume", const="latest", metavar="latest|CHECKPOINT_DIR")
    device: str = option("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N", eval="flag")
    fsdp: bool = option(False, "FSDP2 under torchrun: policy, its optimizer state, reference and initial model "
                        "sharded over the ranks (fasttrdpo.training.fsdp)")

    def __post_init__(self):
        # lists as lists (a tuple from Python code, a list from JSON: the same config, the same record)
        for name in ("loss_type", "label_smoothing", "loss_weights", "lora_target_modules", "report_to"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        try:  # the loss settings as TRDPOLoss checks them, before anything else runs
            check_loss_config(self.beta, self.loss_type, self.label_smoothing, loss_weights=self.loss_weights,
                              discopop_tau=self.discopop_tau, accept=LOSS_TYPES)
        except (ValueError, TypeError) as e:
            raise ValueError(f"TRDPOConfig: {e}") from None
        from .reporting import normalize_report_to

        try:
            normalize_report_to(self.report_to)
        except (ValueError, TypeError) as e:
            raise ValueError(f"TRDPOConfig: {e}") from None
        kto = self.trainer == "kto"
        checks = [
            (not (self.packing or self.share_prompt) or self.trainer == "dpo",
             "packing / share_prompt apply to preference pairs (trainer='dpo'); TR-KTO rows stay padded"),
            (self.trainer in ("dpo", "kto"), "trainer must be 'dpo' or 'kto'"),
            (self.desirable_weight >= 0 and self.undesirable_weight >= 0,
             "desirable_weight and undesirable_weight must be >= 0"),
            (kto or (self.desirable_weight == 1.0 and self.undesirable_weight == 1.0),
             "desirable_weight / undesirable_weight apply to trainer='kto' only"),
            (not kto or (self.loss_type == "sigmoid" and self.label_smoothing == 0.0 and self.loss_weights is None
                         and self.discopop_tau == type(self).discopop_tau),
             "trainer='kto' has its own loss: loss_type, label_smoothing, loss_weights and discopop_tau apply to "
             "trainer='dpo'"),
            (self.train_sampling_strategy in ("auto", "random", "sequential"),
             "train_sampling_strategy must be 'auto', 'random' or 'sequential'"),
            (kto or self.train_sampling_strategy != "sequential",
             "train_sampling_strategy='sequential' applies to trainer='kto' only"),
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
        try:
            check_lora_config(self)
        except ValueError as e:
            raise ValueError(f"TRDPOConfig: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
