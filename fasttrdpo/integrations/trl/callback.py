"""FusedSyncRefModelCallback: a drop-in for TRL's SyncRefModelCallback that blends with fasttrdpo.

TRL's callback loops over parameters with `mul_` + `add_` (two kernels per tensor, 10 B/element in
bf16), gathers everything to rank 0 under ZeRO-3, forgets the reference on resume and refuses PEFT.
This one runs one fused `blend_` over all parameters through `fasttrdpo.RefModelUpdater` (DDP: every
rank blends its copy; FSDP2: local shards only; DeepSpeed ZeRO-3: each rank's own partitions, in place, see
sharding.Zero3RefModelUpdater), saves the reference beside every checkpoint (one file per rank when sharded,
refused on resume at another world size) and restores it on resume, and updates a PEFT reference adapter.

`FusedDPOTrainer(..., args=DPOConfig(sync_ref_model=True, ...))` uses it without further ado. Swap it into
TRL's own DPOTrainer, GRPOTrainer, RLOOTrainer or KTOTrainer (each adds TRL's callback for
sync_ref_model=True; same schedule: `ref_model_sync_steps`, `ref_model_mixup_alpha`):

    trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(..., sync_ref_model=True,
                         ref_model_mixup_alpha=0.6, ref_model_sync_steps=512), ...)
    FusedSyncRefModelCallback.replace_in(trainer)   # removes TRL's SyncRefModelCallback, adds this one
    trainer.train()

PEFT (TRL raises for sync_ref_model=True with PEFT): pass a PeftModel (wrapped with get_peft_model
yourself, not through `peft_config=`): DPOTrainer then adds an adapter "ref", a copy of "default",
and uses it as the reference. Keep sync_ref_model=False and add the callback:

    model = peft.get_peft_model(model, lora_config)
    trainer = DPOTrainer(model=model, args=DPOConfig(..., sync_ref_model=False), ...)
    trainer.add_callback(FusedSyncRefModelCallback(alpha=1.0, tau=512))   # exact hard update of the adapter

(alpha < 1 on LoRA factors needs lora_soft="factors": see fasttrdpo.ref_update for why it is not exact.)
"""
from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from ...ref_update import RefModelUpdater, unwrap_model
from .sharding import Zero3RefModelUpdater, make_updater, sharded_reference

STATE_FILE = "fasttrdpo_ref_update.pt"
_log = logging.getLogger("fasttrdpo")


def _has_adapter(model, name: str) -> bool:
    configs = getattr(unwrap_model(model), "peft_config", None) if model is not None else None
    return isinstance(configs, dict) and name in configs


class FusedSyncRefModelCallback(TrainerCallback):
    """Blend the reference toward the policy every `tau` optimizer steps (at on_step_end).

    Args:
        ref_model: the reference model (TRL's `trainer.ref_model`); None with a PEFT policy that carries
            a reference adapter (`ref_adapter`, default "ref").
        accelerator: optional; used to unwrap the policy (as TRL's callback does).
        alpha, tau: default to the trainer args' `ref_model_mixup_alpha` / `ref_model_sync_steps`.
        policy_adapter, ref_adapter, lora_soft, check_finite, backend: passed to RefModelUpdater.
        resume_from: checkpoint folder to restore the reference from at train begin; by default
            `<output_dir>/checkpoint-<global_step>` when training resumes (global_step > 0).
    """

    def __init__(self, ref_model: torch.nn.Module | None = None, accelerator=None, *, alpha: float | None = None,
                 tau: int | None = None, policy_adapter: str | None = None, ref_adapter: str | None = None,
                 lora_soft: str = "error", check_finite: bool = True, backend: str = "auto",
                 resume_from: str | None = None):
        self.ref_model = ref_model
        self.accelerator = accelerator
        self.alpha, self.tau = alpha, tau
        self.policy_adapter, self.ref_adapter = policy_adapter, ref_adapter
        self.lora_soft, self.check_finite, self.backend = lora_soft, check_finite, backend
        self.resume_from = resume_from
        self.updater: RefModelUpdater | None = None

    @classmethod
    def replace_in(cls, trainer, **kwargs) -> "FusedSyncRefModelCallback":
        """Remove TRL's SyncRefModelCallback (and any FusedSyncRefModelCallback already there: two would blend
        twice per update) from `trainer` and add this callback in their place, blending `trainer.ref_model`.
        Works for every TRL trainer that syncs its reference: DPOTrainer, GRPOTrainer, RLOOTrainer, KTOTrainer
        (FusedDPOTrainer with sync_ref_model=True calls this itself). A trainer without a ref_model (GRPO/RLOO
        with beta=0.0) is a ValueError, before anything is changed."""
        from trl.trainer.callbacks import SyncRefModelCallback

        ref_model = getattr(trainer, "ref_model", None)
        if ref_model is None and not _has_adapter(trainer.model, kwargs.get("ref_adapter") or "ref"):
            raise ValueError(
                f"{type(trainer).__name__} has no ref_model to sync (GRPOTrainer/RLOOTrainer build none when "
                "beta=0.0; a PEFT policy without a reference adapter uses the adapter-free base): nothing to blend. "
                "Set beta > 0, or give the PeftModel a reference adapter (ref_adapter=...).")
        for old in (SyncRefModelCallback, FusedSyncRefModelCallback):
            while any(isinstance(cb, old) for cb in trainer.callback_handler.callbacks):
                trainer.remove_callback(old)
        callback = cls(ref_model=ref_model, accelerator=getattr(trainer, "accelerator", None), **kwargs)
        trainer.add_callback(callback)
        return callback

    def _policy(self, model):
        if self.accelerator is not None:
            model = self.accelerator.unwrap_model(model)
        return unwrap_model(model)

    def _build(self, args, model) -> RefModelUpdater:
        if model is None:
            raise ValueError("FusedSyncRefModelCallback needs the trainer's model (callback kwargs 'model')")
        policy = self._policy(model)
        alpha = self.alpha if self.alpha is not None else getattr(args, "ref_model_mixup_alpha", None)
        tau = self.tau if self.tau is not None else getattr(args, "ref_model_sync_steps", None)
        if alpha is None or tau is None:
            raise ValueError("alpha and tau must be given, or the training args must define "
                             "ref_model_mixup_alpha and ref_model_sync_steps (TRL's DPOConfig does)")
        ref = self.ref_model if self.ref_model is not None else policy  # None: a PEFT reference adapter
        # ZeRO-3: Zero3RefModelUpdater (each rank's partitions); otherwise RefModelUpdater (FSDP2: local shards)
        return make_updater(policy=policy, ref=ref, alpha=alpha, tau=tau, check_finite=self.check_finite,
                            backend=self.backend, policy_adapter=self.policy_adapter,
                            ref_adapter=self.ref_adapter, lora_soft=self.lora_soft)

    def _state_path(self, folder: str, args) -> str:
        # DDP ranks hold identical references (rank 0 writes); FSDP2 / ZeRO-3 ranks hold different shards.
        sharded = self.updater is not None and sharded_reference(self.updater)
        rank = int(getattr(args, "process_index", 0) or 0)
        return os.path.join(folder, f"{STATE_FILE[:-3]}.rank{rank}.pt" if sharded else STATE_FILE)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.updater = self._build(args, model)
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if folder is not None:
            path = self._state_path(folder, args)
            if sharded_reference(self.updater):
                self._check_world_size(folder)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if sharded_reference(self.updater) and not isinstance(self.updater, Zero3RefModelUpdater):
                    saved = dict(saved)
                    self._check_layout(saved.pop("partitions", None), path)  # FSDP2 shards of this rank/world
                self.updater.load_state_dict(saved)
            else:
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {path} does not exist: the reference weights "
                    "would silently restart from the initial model. Pass resume_from=<checkpoint folder>.")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.updater is None:  # a trainer that skipped on_train_begin
            self.updater = self._build(args, model)
        self.updater.step(global_step=state.global_step)

    @staticmethod
    def _layout() -> dict:
        import torch.distributed as dist

        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}

    def _check_world_size(self, folder: str) -> None:
        """Sharded references are saved one file per rank: refuse a checkpoint written by another world size
        (its shards / partitions do not line up with this run's) before anything is loaded."""
        here = self._layout()["world_size"]
        files = sorted(f for f in os.listdir(folder) if f.startswith(STATE_FILE[:-3] + ".rank")) \
            if os.path.isdir(folder) else []
        if files and len(files) != here:
            raise ValueError(
                f"{folder} holds the sharded reference of {len(files)} processes ({files[0]}, ...) but this run has "
                f"{here}: the reference shards/partitions cannot be resumed at another world size; resume with "
                f"{len(files)} processes")

    def _check_layout(self, saved, path: str) -> None:
        here = self._layout()
        if saved != here:
            raise ValueError(f"{path} holds the reference shards of rank {(saved or {}).get('rank')} of "
                             f"{(saved or {}).get('world_size')} processes, this is rank {here['rank']} of "
                             f"{here['world_size']}: resume with the same number of processes")

    def on_save(self, args, state, control, **kwargs):
        if self.updater is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = self._state_path(folder, args)
        if path.endswith(STATE_FILE) and not state.is_world_process_zero:
            return
        os.makedirs(folder, exist_ok=True)
        saved = self.updater.state_dict()
        if sharded_reference(self.updater) and "partitions" not in saved:  # FSDP2 (ZeRO-3's updater records its own)
            saved["partitions"] = self._layout()
            # this rank's local shards as plain tensors (what load_state_dict copies into to_local())
            saved["ref"] = {n: (t.to_local() if hasattr(t, "to_local") else t) for n, t in saved["ref"].items()}
        torch.save(saved, path + ".tmp")
        os.replace(path + ".tmp", path)
