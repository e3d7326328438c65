"""The thin TR-DPO trainer: composes `fasttrdpo.loss.TRDPOLoss` and `fasttrdpo.RefModelUpdater`.

Per optimizer step: the policy backbone (never the LM head) gives hidden states, the reference backbone
runs under no_grad, and `TRDPOLoss` takes both with the lm_head weights -> logits are never formed in
training. Every tau optimizer steps the updater blends the policy into the reference. Evaluation adds
the exact full-vocabulary KL of the policy to the reference and to the initial model (chunked logits;
evaluation only). Checkpoints are atomic (temporary directory + rename); DDP via torchrun.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .data import PreferenceCollator, TokenizedPair, tokenize_dataset

_log = logging.getLogger("fasttrdpo")

# metric names logged per training step (TRL's names), in the order TRDPOLoss returns them
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class TRDPOConfig:
    """Training configuration. Defaults follow TRL / the TR-DPO paper (the CLI demo overrides some)."""

    output_dir: str = "outputs/fasttrdpo"  # outputs/ is git-ignored
    # loss
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
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
    lr_scheduler_type: str = "linear"  # linear | constant | cosine (after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int = 4  # pairs per rank per micro-batch
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    max_grad_norm: float = 1.0  # <= 0: no clipping
    bf16: bool = False  # autocast to bf16, fp32 master weights
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

    def __post_init__(self):
        checks = [
            (self.beta > 0, "beta must be > 0"),
            (self.loss_type in ("sigmoid", "hinge", "ipo", "robust"),
             "loss_type must be one of sigmoid, hinge, ipo, robust"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.tau >= 1, "tau must be >= 1"),
            (self.ref_dtype is None or self.ref_dtype in _DTYPES,
             f"ref_dtype must be None or one of {sorted(_DTYPES)}"),
            (self.learning_rate >= 0, "learning_rate must be >= 0"),
            (self.lr_scheduler_type in ("linear", "constant", "cosine"),
             "lr_scheduler_type must be linear, constant or cosine"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio <= 1, "warmup must be >= 0"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps > 0 or num_train_epochs > 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
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


# ----------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------

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


class _HiddenStates(torch.nn.Module):
    """The module DDP wraps: runs the backbone only and returns the last hidden states."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.backbone, self.head = causal_lm_parts(model)

    def forward(self, input_ids, attention_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _frozen_copy(model, dtype: torch.dtype | None):
    twin = copy.deepcopy(model)
    if dtype is not None:
        twin.to(dtype)
    twin.eval()
    twin.requires_grad_(False)
    return twin


def _tied_parameter_names(model) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied.add(name)
            tied.add(seen[key])
        seen[key] = name
    return tied


def save_weights(model, folder: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)


def load_weights(model, folder: str) -> None:
    """Load weights written by `save_weights` into an existing model (dtype and device kept), exactly."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    names = _saved_name_map(model)
    state = {names.get(k, k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - _tied_parameter_names(model)
    buffers = {n for n, _ in model.named_buffers()}
    if unexpected or (missing - buffers):
        raise ValueError(f"weights in {folder} do not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def _saved_name_map(model) -> dict[str, str]:
    """{name in the saved file: name in the model}. transformers 5 renames some weights on save (e.g.
    GPTNeoX lm_head -> embed_out, its legacy name); invert that renaming by tensor identity."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: saved names are the module names
        return {k: k for k in state}
    by_id = {id(v): k for k, v in state.items()}
    mapping = {}
    for saved, tensor in revert_weight_conversion(model, dict(state)).items():
        ours = by_id.get(id(tensor))
        if ours is None:
            raise NotImplementedError(f"{type(model).__name__} converts weight {saved!r} on save (not a plain "
                                      "rename): resuming it in place is not supported")
        mapping[saved] = ours
    return mapping


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in output_dir (temporary dirs are ignored)."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.pt")):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), path)
    return best[1] if best else None


def _fsync_tree(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------

class TRDPOTrainer:
    """TR-DPO on a Hugging Face causal LM. `train()` runs to max_steps (or the epochs) and returns the
    final metrics; `evaluate()` returns held-out reward accuracy/margins and the KL figures.

    model: the policy (its weights are trained in place). ref_model: the reference; by default a copy of
    the policy (in `config.ref_dtype`). train_dataset / eval_dataset: `datasets.Dataset` (or lists of
    dicts) with prompt, chosen, rejected strings. init_model: the model KL(policy || initial) is measured
    against at evaluation (default: a copy of `model` as given; False: do not report it). Under torchrun
    (WORLD_SIZE > 1) it runs DDP.
    """

    def __init__(self, model, tokenizer, train_dataset, config: TRDPOConfig, ref_model=None,
                 eval_dataset=None, *, init_model=None):
        from .loss import TRDPOLoss
        from .ref_update import RefModelUpdater

        if not isinstance(config, TRDPOConfig):
            raise TypeError(f"config must be a TRDPOConfig, got {type(config).__name__}")
        if train_dataset is None and eval_dataset is None:
            raise ValueError("give a train_dataset (to train) or an eval_dataset (to evaluate)")
        causal_lm_parts(model)  # a causal LM with a plain lm_head, checked before anything moves
        if ref_model is not None:
            causal_lm_parts(ref_model)
        self.config = config
        self.tokenizer = tokenizer
        self._init_distributed()
        self.device = self._pick_device()
        self.ref_dtype = _DTYPES[config.ref_dtype] if config.ref_dtype else None

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.collator = PreferenceCollator(tokenizer.pad_token_id)
        self.train_pairs = self._tokenize(train_dataset)
        self.eval_pairs = self._tokenize(eval_dataset)
        self.global_step = 0
        self.total_steps = self._total_steps() if self.train_pairs else 0  # raises on too little data

        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # the transformers >= 5 name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.policy = _HiddenStates(self.model)
        self.ref_model = (_frozen_copy(self.model, self.ref_dtype) if ref_model is None
                          else _frozen_copy(ref_model.to(self.device), self.ref_dtype))
        self.ref_backbone, self.ref_head = causal_lm_parts(self.ref_model)
        # the initial policy, kept only to report KL(policy || initial) at evaluation
        if init_model is False or not (config.eval_kl and self.eval_pairs):
            self.init_model = None
        elif init_model is None:
            self.init_model = _frozen_copy(self.model, self.ref_dtype)
        else:
            self.init_model = _frozen_copy(init_model.to(self.device), self.ref_dtype)
        if self.world_size > 1:
            self._broadcast_frozen()
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.policy_ddp = DDP(self.policy, device_ids=[self.device.index] if self.device.type == "cuda"
                                  else None)
        else:
            self.policy_ddp = self.policy

        self.loss_fn = TRDPOLoss(beta=config.beta, loss_type=config.loss_type,
                                 label_smoothing=config.label_smoothing, ignore_index=self.collator.ignore_index)
        self.updater = (RefModelUpdater(policy=self.model, ref=self.ref_model, alpha=config.alpha, tau=config.tau)
                        if config.sync_ref_model else None)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_epsilon, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.history: list[dict] = []
        self.rank_fingerprints: list[dict] | None = None
        self.is_main = self.rank == 0
        self.metrics_path = os.path.join(config.output_dir, "metrics.jsonl")

    # --- set-up helpers ------------------------------------------------------------------------------

    def _init_distributed(self):
        self._owns_process_group = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.config.device in ("auto", "cuda") else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_process_group = True
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _pick_device(self) -> torch.device:
        want = self.config.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device(want)

    def _tokenize(self, dataset) -> list[TokenizedPair]:
        if dataset is None:
            return []
        if isinstance(dataset, list):
            import datasets

            dataset = datasets.Dataset.from_list(dataset)
        return tokenize_dataset(dataset, self.tokenizer, max_length=self.config.max_length,
                                max_prompt_length=self.config.max_prompt_length)

    def _broadcast_frozen(self):
        """Make the reference (and initial model) bitwise identical on every rank (rank 0's copy)."""
        for module in (self.ref_model, self.init_model):
            if module is None:
                continue
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

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

    def _lr_lambda(self, step: int) -> float:
        c = self.config
        warmup = c.warmup_steps or math.ceil(c.warmup_ratio * self.total_steps)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if c.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        if c.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # --- data order: a function of the step only (what makes resume exact) --------------------------

    def _step_indices(self, step: int) -> list[list[int]]:
        """The pair indices this rank uses at optimizer step `step`: one list per micro-batch."""
        c = self.config
        seed = c.seed if c.data_seed is None else c.data_seed
        epoch, batch = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(self.train_pairs), generator=g)
        G, B, W = self.global_batch_size, c.per_device_train_batch_size, self.world_size
        chunk = order[batch * G:(batch + 1) * G].tolist()
        return [chunk[(a * W + self.rank) * B:(a * W + self.rank + 1) * B]
                for a in range(c.gradient_accumulation_steps)]

    # --- forward --------------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _batch(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.collator(pairs).items()}

    def _ref_hidden(self, module, batch):
        """Hidden states of a frozen model (the reference, or the initial model) without autograd."""
        backbone = self.ref_backbone if module is self.ref_model else causal_lm_parts(module)[0]
        with torch.no_grad():
            out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.last_hidden_state

    def _loss(self, batch, policy_module):
        # the backbones run under autocast (bf16 activations); the loss does its own fp32 math on them
        with self._autocast():
            hidden = policy_module(batch["input_ids"], batch["attention_mask"])
            ref_hidden = self._ref_hidden(self.ref_model, batch)
        return self.loss_fn(hidden, self.policy.head.weight, batch["labels"], ref_hidden, self.ref_head.weight,
                            policy_bias=self.policy.head.bias, ref_bias=self.ref_head.bias)

    # --- training -------------------------------------------------------------------------------------

    def train(self) -> dict:
        c = self.config
        if not self.train_pairs:
            raise ValueError("train() needs a train_dataset")
        if self.is_main:
            os.makedirs(c.output_dir, exist_ok=True)
        if c.resume_from_checkpoint:
            self.load_checkpoint(c.resume_from_checkpoint)
        else:
            _seed_all(c.seed + self.rank)
            if self.is_main:
                open(self.metrics_path, "w").close()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="TR-DPO", dynamic_ncols=True,
                   disable=not self.is_main or c.disable_tqdm)
        if self.eval_pairs and c.eval_steps and self.global_step == 0:
            self._log(self.evaluate())  # the starting point of the eval curves (KL = 0)
        window: list[torch.Tensor] = []  # per-step metric vectors since the last log
        t_window = time.perf_counter()
        last_saved = self.global_step if c.resume_from_checkpoint else -1
        accum = c.gradient_accumulation_steps
        while self.global_step < self.total_steps:
            micro_batches = self._step_indices(self.global_step)
            step_sum = None
            for a, idx in enumerate(micro_batches):
                batch = self._batch([self.train_pairs[i] for i in idx])
                sync = a == accum - 1 or self.world_size == 1
                ctx = contextlib.nullcontext() if sync else self.policy_ddp.no_sync()
                with ctx:
                    loss, metrics = self._loss(batch, self.policy_ddp)
                    (loss / accum).backward()
                vec = torch.stack([loss.detach().float()] + [metrics[k].detach().float().reshape(()) for k in TRL_METRICS])
                step_sum = vec if step_sum is None else step_sum + vec
            if c.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            if self.updater is not None:
                self.updater.step(self.global_step)  # blends iff global_step % tau == 0
            window.append(torch.cat([step_sum / accum, grad_norm.detach().float().reshape(1).to(step_sum.device)]))
            bar.update(1)

            done = self.global_step >= self.total_steps
            if self.global_step % c.logging_steps == 0 or done:
                record = self._reduce_window(window, lr, time.perf_counter() - t_window)
                window, t_window = [], time.perf_counter()
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.3f}",
                                refs=self.ref_updates)
            if self.eval_pairs and c.eval_steps and self.global_step % c.eval_steps == 0 and not done:
                self._log(self.evaluate())
            if c.save_steps and self.global_step % c.save_steps == 0:
                self.save_checkpoint()
                last_saved = self.global_step
        bar.close()
        if self.world_size > 1:
            self.check_ranks_agree()
        final = {}
        if self.eval_pairs:
            final = self.evaluate()
            self._log(final)
        if last_saved != self.global_step:
            self.save_checkpoint()
        if self.is_main and c.plot:
            self.plot()
        return final

    def _reduce_window(self, window: list[torch.Tensor], lr: float, seconds: float) -> dict:
        mean = torch.stack(window).mean(0)
        if self.world_size > 1:
            # grad_norm (last entry) is already global after DDP's all-reduce: average it too, it is equal
            dist.all_reduce(mean, op=dist.ReduceOp.SUM)
            mean /= self.world_size
        values = mean.tolist()
        record = {"step": self.global_step, "epoch": round(self.global_step / self.steps_per_epoch, 4),
                  "loss": values[0]}
        record.update({k: v for k, v in zip(TRL_METRICS, values[1:])})
        record.update({"grad_norm": values[-1], "learning_rate": lr, "ref_updates": self.ref_updates,
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

    # --- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, rewards (accuracy, margins) and, with eval_kl, the exact per-token
        KL(policy || reference) and KL(policy || initial model) over the completion tokens, averaged
        over tokens. Logits for the KL are formed chunk by chunk (kl_chunk_tokens rows at a time)."""
        if not self.eval_pairs:
            raise ValueError("evaluate() needs an eval_dataset")
        c = self.config
        was_training = self.model.training
        self.model.eval()
        mine = self.eval_pairs[self.rank::self.world_size]
        n_metrics = 1 + len(TRL_METRICS)
        # + pairs, kl_ref, kl_init, tokens, accuracy and margin of the rewards measured against the initial model
        sums = torch.zeros(n_metrics + 6, dtype=torch.float64, device=self.device)
        for start in range(0, len(mine), c.per_device_eval_batch_size):
            pairs = mine[start:start + c.per_device_eval_batch_size]
            batch = self._batch(pairs)
            with self._autocast():
                hidden = self.policy(batch["input_ids"], batch["attention_mask"])
                ref_hidden = self._ref_hidden(self.ref_model, batch)
            loss, metrics = self.loss_fn(hidden, self.policy.head.weight, batch["labels"], ref_hidden,
                                         self.ref_head.weight, policy_bias=self.policy.head.bias,
                                         ref_bias=self.ref_head.bias)
            n = len(pairs)
            vec = torch.stack([loss.float()] + [metrics[k].float().reshape(()) for k in TRL_METRICS])
            sums[:n_metrics] += vec.double() * n
            sums[n_metrics] += n
            if c.eval_kl:
                mask = batch["labels"] != self.collator.ignore_index
                h = hidden[mask]
                sums[n_metrics + 1] += self._kl_sum(h, self.policy.head, ref_hidden[mask], self.ref_head)
                if self.init_model is not None:
                    init_head = self.init_model.get_output_embeddings()
                    with self._autocast():
                        init_hidden = self._ref_hidden(self.init_model, batch)
                    sums[n_metrics + 2] += self._kl_sum(h, self.policy.head, init_hidden[mask], init_head)
                    _, vs_init = self.loss_fn(hidden, self.policy.head.weight, batch["labels"], init_hidden,
                                              init_head.weight, policy_bias=self.policy.head.bias,
                                              ref_bias=init_head.bias)
                    sums[n_metrics + 4] += float(vs_init["rewards/accuracies"]) * n
                    sums[n_metrics + 5] += float(vs_init["rewards/margins"]) * n
                sums[n_metrics + 3] += int(mask.sum())
        if self.world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        s = sums.tolist()
        pairs_total = max(s[n_metrics], 1.0)
        record = {"step": self.global_step, "eval_loss": s[0] / pairs_total}
        record.update({f"eval_{k}": v / pairs_total for k, v in zip(TRL_METRICS, s[1:n_metrics])})
        if c.eval_kl:
            tokens = max(s[n_metrics + 3], 1.0)
            record["eval_kl/ref"] = s[n_metrics + 1] / tokens
            if self.init_model is not None:
                record["eval_kl/init"] = s[n_metrics + 2] / tokens
                # the same rewards measured against the initial model instead of the moving reference
                record["eval_init_rewards/accuracies"] = s[n_metrics + 4] / pairs_total
                record["eval_init_rewards/margins"] = s[n_metrics + 5] / pairs_total
        record["eval_pairs"] = int(s[n_metrics])
        record["ref_updates"] = self.ref_updates
        if was_training:
            self.model.train()
        return record

    def _kl_sum(self, hidden_p, head_p, hidden_q, head_q) -> float:
        """sum over tokens of KL(p || q) = sum_v p_v (log p_v - log q_v), in fp32, chunked over tokens."""
        total = 0.0
        wp, wq = head_p.weight.float(), head_q.weight.float()
        bp = None if head_p.bias is None else head_p.bias.float()
        bq = None if head_q.bias is None else head_q.bias.float()
        for i in range(0, hidden_p.shape[0], self.config.kl_chunk_tokens):
            lp = torch.log_softmax(torch.nn.functional.linear(hidden_p[i:i + self.config.kl_chunk_tokens].float(), wp, bp), -1)
            lq = torch.log_softmax(torch.nn.functional.linear(hidden_q[i:i + self.config.kl_chunk_tokens].float(), wq, bq), -1)
            total += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
        return total

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Write output_dir/checkpoint-<step> atomically: everything goes to a temporary directory that
        is renamed into place once complete (and fsynced), so a kill at any moment leaves the previous
        checkpoint intact and never a partial one under a checkpoint-<step> name."""
        c = self.config
        name = f"checkpoint-{self.global_step}"
        final = os.path.join(c.output_dir, name)
        tmp = os.path.join(c.output_dir, f".tmp-{name}")
        if self.is_main:
            os.makedirs(c.output_dir, exist_ok=True)
            for leftover in os.listdir(c.output_dir):  # debris of a save or a deletion cut by a kill
                if leftover.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                    shutil.rmtree(os.path.join(c.output_dir, leftover), ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
        if self.is_main:
            save_weights(self.model, tmp)
            save_weights(self.ref_model, os.path.join(tmp, "reference"))
            self.tokenizer.save_pretrained(tmp)
            state = {
                "global_step": self.global_step,
                "data_position": {"epoch": self.global_step // self.steps_per_epoch,
                                  "batch_in_epoch": self.global_step % self.steps_per_epoch,
                                  "global_batch_size": self.global_batch_size},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "updater": self.updater.state_dict(ref_weights=False) if self.updater is not None else None,  # ref saved apart
                "ref_updates": self.ref_updates,
                "world_size": self.world_size,
                "config": c.to_dict(),
            }
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({k: state[k] for k in ("global_step", "data_position", "ref_updates", "world_size",
                                                 "config")}, f, indent=1)
        self._barrier()
        if self.is_main:
            _fsync_tree(tmp)
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): move the old one away first
                shutil.rmtree(final + ".old", ignore_errors=True)
                os.rename(final, final + ".old")
            os.rename(tmp, final)
            _fsync_dir(c.output_dir)
            shutil.rmtree(final + ".old", ignore_errors=True)
            self._rotate_checkpoints()
        self._barrier()
        return final

    def _rotate_checkpoints(self):
        limit = self.config.save_total_limit
        if limit is None:
            return
        out = self.config.output_dir
        steps = sorted(int(m.group(1)) for n in os.listdir(out) if (m := CHECKPOINT_RE.match(n)))
        for step in steps[:-limit]:
            path = os.path.join(out, f"checkpoint-{step}")
            trash = os.path.join(out, f".trash-checkpoint-{step}")
            os.rename(path, trash)  # atomic: a half-deleted directory never looks like a checkpoint
            shutil.rmtree(trash, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore policy, reference, optimizer, scheduler, updater, RNG and data position."""
        if path == "latest":
            found = find_latest_checkpoint(self.config.output_dir)
            if found is None:
                raise FileNotFoundError(f"resume 'latest': no checkpoint in {self.config.output_dir}")
            path = found
        if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
            raise FileNotFoundError(f"{path} is not a fasttrdpo checkpoint (no trainer_state.pt)")
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location=self.device, weights_only=False)
        if state["data_position"]["global_batch_size"] != self.global_batch_size:
            raise ValueError(f"checkpoint was written with global batch {state['data_position']['global_batch_size']}, "
                             f"this run has {self.global_batch_size}: the data position would not match")
        load_weights(self.model, path)
        load_weights(self.ref_model, os.path.join(path, "reference"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.updater is not None and state["updater"] is not None:
            self.updater.load_state_dict(state["updater"])
        self.global_step = state["global_step"]
        rng_file = os.path.join(path, f"rng_state_{self.rank}.pt")
        if not os.path.exists(rng_file):
            rng_file = os.path.join(path, "rng_state_0.pt")
        _set_rng_state(torch.load(rng_file, weights_only=False))
        if self.is_main:
            self._truncate_metrics(self.global_step)
        if self.is_main:
            _log.info("resumed from %s at step %d", path, self.global_step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records logged after the checkpoint (the killed run got further than it saved)."""
        kept = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the kill
                    if rec.get("step", 0) <= step:
                        kept.append(rec)
        self.history = kept
        with open(self.metrics_path, "w") as f:
            for rec in kept:
                f.write(json.dumps(rec) + "\n")

    def fingerprints(self) -> dict[str, str]:
        """sha256 of the policy's and the reference's parameter bytes (to compare ranks or runs)."""
        import hashlib

        out = {}
        for name, module in (("policy", self.model), ("reference", self.ref_model)):
            h = hashlib.sha256()
            for pname, p in module.named_parameters():
                h.update(pname.encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            out[name] = h.hexdigest()
        return out

    def check_ranks_agree(self) -> list[dict]:
        """Under DDP: gather every rank's fingerprints; raise if the policy or the reference differ."""
        mine = self.fingerprints()
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        self.rank_fingerprints = gathered
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError(f"DDP ranks disagree on the policy or the reference weights: {gathered}")
        return gathered

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()

    # --- plot -----------------------------------------------------------------------------------------

    def plot(self, path: str | None = None) -> str | None:
        """PNG of the training curves (loss, reward accuracy, margins, KL). Needs matplotlib."""
        return plot_metrics(self.history, path or os.path.join(self.config.output_dir, "training_curves.png"))

    def close(self):
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def plot_metrics(history: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.warning("matplotlib is not installed: no plot (pip install 'fasttrdpo[plot]')")
        return None
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("loss", "eval_loss", "loss"), ("rewards/accuracies", "eval_rewards/accuracies", "reward accuracy"),
              ("rewards/margins", "eval_rewards/margins", "reward margin")]
    for ax, (k_train, k_eval, title) in zip(axes, panels):
        ax.plot([r["step"] for r in train], [r[k_train] for r in train], label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r[k_eval] for r in evals], "o-", label="eval")
        init_key = k_eval.replace("eval_rewards/", "eval_init_rewards/")
        pts = [(r["step"], r[init_key]) for r in evals if init_key in r]
        if pts and init_key != k_eval:
            ax.plot(*zip(*pts), "s--", label="eval, vs initial model")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend()
    ax = axes[3]
    for key, label in (("eval_kl/ref", "KL(policy || reference)"), ("eval_kl/init", "KL(policy || initial)")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_title("per-token KL on eval completions")
    ax.set_xlabel("optimizer step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
