"""Subprocess worker for tests/test_trl_sharded.py: FusedDPOTrainer in one process, or in 2 CPU processes
(gloo) under accelerate FSDP2 or DeepSpeed ZeRO-3.

    python trl_sharded_worker.py single OUT_DIR            1 process, per-device batch 4 pairs
    python trl_sharded_worker.py fsdp2  OUT_DIR            one of 2 processes (RANK/WORLD_SIZE/MASTER_* in env)
    python trl_sharded_worker.py zero3  OUT_DIR            idem, DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu)

All runs: the same tiny GPTNeoX policy and reference, the same 12 pairs, global batch 4 pairs, 3 SGD steps
(lr 0.5), fp32, TR-DPO with alpha 0.6 and tau 1 (the reference blended after every step, through
FusedSyncRefModelCallback). Writes OUT_DIR/result.rank{R}.pt: per-step losses, the final policy and reference
(gathered, for the test only) and what the collectives counted during the reference updates.

The accelerate set-up below is a CPU-only trick for the tests (accelerate does not set FSDP2 / DeepSpeed up
on CPU by itself); the library code does not depend on it.
"""
from __future__ import annotations

import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, GLOBAL_PAIRS, ALPHA, LR = 3, 4, 0.6, 0.5
# TRL's per-token means: token sums over all processes / their token counts
TOKEN_MEANS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


def dataset(n=STEPS * GLOBAL_PAIRS):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "tree", "blue", "sun", "rain", "sky", "red", "stone", "river"]
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))  # noqa: E731
    return Dataset.from_list([{"prompt": f"Q: {pick(2)}?", "chosen": f" {pick(2)}.", "rejected": f" {pick(3)}!"}
                              for _ in range(n)])


def cpu_distributed_state(mode):
    """The CPU-only set-up (see the module docstring): accelerate's state before DPOConfig reads it."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if mode == "fsdp2":
        state = PartialState(cpu=True)  # MULTI_CPU + gloo; AcceleratorState turns the GPU kind into FSDP
        state.distributed_type = DistributedType.MULTI_GPU
    else:
        # DeepSpeed's CPU comm backend would JIT-build its shared-memory all-reduce (deepspeed_shm_comm, 50-85 s
        # the first time); marking it incompatible makes DeepSpeed use torch.distributed (gloo) instead, no build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")


class CollectiveCounter:
    """Counts torch.distributed collectives (and DeepSpeed's comm wrappers) while `active`."""

    # every collective entry point (torch 2.13 adds all_gather_single / reduce_scatter_single, which FSDP2 uses)
    PATTERN = ("all_gather", "broadcast", "reduce", "scatter", "gather", "all_to_all", "send", "recv")

    def __init__(self, with_deepspeed: bool):
        import torch.distributed as dist

        self.active, self.counts = None, collections.Counter()  # active: the bucket counted into, or None
        modules = [dist, dist.distributed_c10d]
        if with_deepspeed:
            import deepspeed.comm as ds_comm

            modules.append(ds_comm)
        import inspect

        for module in modules:
            for name in dir(module):
                fn = getattr(module, name, None)
                if any(k in name for k in self.PATTERN) and inspect.isfunction(fn) and not name.startswith("__"):
                    setattr(module, name, self._wrap(module.__name__, name, fn))

    def _wrap(self, where, name, fn):
        def counted(*args, **kwargs):
            if self.active:
                self.counts[f"{self.active}:{where}.{name}"] += 1
            return fn(*args, **kwargs)
        return counted


def run(mode, out_dir):
    distributed = mode != "single"
    torch.set_num_threads(1)
    # installed before any process group or DeepSpeed backend exists, so none holds an unwrapped reference
    counter = CollectiveCounter(with_deepspeed=mode == "zero3") if distributed else None
    if distributed:
        cpu_distributed_state(mode)
    from trl import DPOConfig

    from fasttrdpo.integrations.trl import FusedDPOTrainer
    from fasttrdpo.tiny import tiny_model, tiny_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if mode == "fsdp2":
        extra = dict(fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                               "transformer_layer_cls_to_wrap": ["GPTNeoXLayer"]},
                     accelerator_config={"use_configured_state": True})
    elif mode == "zero3":
        extra = dict(deepspeed={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
                                "train_micro_batch_size_per_gpu": "auto",
                                "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                "gradient_clipping": "auto", "zero_allow_untested_optimizer": True},
                     accelerator_config={"use_configured_state": True})
    # FSDP2: 1 pair per rank and micro-step, 2 micro-steps per optimizer step (gradient accumulation under
    # sharding); ZeRO-3: 2 pairs per rank, no accumulation. Either way 4 pairs per step, as in the single run.
    accumulation = 2 if mode == "fsdp2" else 1
    args = DPOConfig(output_dir=os.path.join(out_dir, "run"),
                     per_device_train_batch_size=GLOBAL_PAIRS // world // accumulation,
                     gradient_accumulation_steps=accumulation,
                     max_steps=STEPS, learning_rate=LR, optim="sgd", logging_steps=1, report_to=[],
                     use_cpu=mode != "zero3",
                     seed=0, beta=0.1, max_length=48, disable_tqdm=True,
                     # ZeRO-3: a real checkpoint at step 2 (DeepSpeed's + the reference partitions) to resume from
                     save_strategy="steps" if mode == "zero3" else "no", save_steps=2,
                     lr_scheduler_type="constant", dataloader_num_workers=0, bf16=False, fp16=False,
                     sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA, **extra)
    def new_trainer():
        return FusedDPOTrainer(model=tiny_model(seed=0, hidden_size=32), ref_model=tiny_model(seed=0, hidden_size=32),
                               args=args, train_dataset=dataset(), processing_class=tiny_tokenizer(),
                               fasttrdpo_backend="eager")

    trainer = new_trainer()

    callback = trainer.ref_sync_callback
    fired, gathered_at_update = [], []
    original_update = None

    def counted_update():
        counter.active = "update"
        try:
            original_update()
        finally:
            counter.active = "train"
        fired.append(type(callback.updater).__name__)
        if hasattr(callback.updater, "_gathered"):  # ZeRO-3: full copies blended beside the partitions
            gathered_at_update.append(len(callback.updater._gathered()[2]))

    def on_train_begin_then_count(*a, **kw):
        nonlocal original_update
        begin(*a, **kw)
        original_update = callback.updater.update
        callback.updater.update = counted_update if distributed else _plain(callback.updater.update, fired)

    begin = callback.on_train_begin
    callback.on_train_begin = on_train_begin_then_count
    if counter:
        counter.active = "train"  # the training steps: proves the counter sees the frameworks' gathers
    trainer.train()
    if counter:
        counter.active = None

    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    result = {"loss": [h["loss"] for h in logs], "margins": [h["rewards/margins"] for h in logs],
              "token_means": [[h[k] for k in TOKEN_MEANS] for h in logs],
              "fired": fired, "collectives": dict(counter.counts) if counter else {},
              "policy": gathered(trainer.model, mode), "ref": gathered(trainer.ref_model, mode)}
    if distributed:
        result["checkpoint"] = checkpoint_checks(callback, trainer)
    if mode == "zero3":
        result["local"] = zero3_local(callback.updater)
        result["gathered_at_update"] = gathered_at_update
        # resume from checkpoint-2 in a new trainer (same processes): step 3 again, from the saved partitions.
        # accelerate allows one DeepSpeed Accelerator per process: forget it (keeping the process group)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        resumed = new_trainer()
        resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
        result["resumed_loss"] = [h["loss"] for h in resumed.state.log_history if "loss" in h and "train_runtime" not in h]
        result["resumed_ref"] = gathered(resumed.ref_model, mode)
        result["resumed_policy"] = gathered(resumed.model, mode)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result, os.path.join(out_dir, f"result.rank{rank}.pt"))


def _plain(update, fired):
    def run_update():
        update()
        fired.append("RefModelUpdater")
    return run_update


def gathered(model, mode):
    """Full parameters by name (the test's own gather; the library never does this)."""
    from fasttrdpo.ref_update import unwrap_model

    module = unwrap_model(getattr(model, "module", model))
    if mode == "zero3":
        import deepspeed

        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().clone() for n, p in params.items()}
    out = {}
    for n, p in module.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def checkpoint_checks(callback, trainer):
    """The reference saved beside a checkpoint (per-rank shards/partitions) and its reload: restored bit-exactly;
    another rank's file or another world size refused (ValueError) with the reference left as it was."""
    import shutil
    import types

    import torch.distributed as dist

    args, rank, world = trainer.args, dist.get_rank(), dist.get_world_size()
    callback.on_save(args, trainer.state, None)
    folder = os.path.join(args.output_dir, f"checkpoint-{trainer.state.global_step}")
    path = callback._state_path(folder, args)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    refs = lambda: [t.detach().clone() for t in callback.updater._tensors()[0]]  # noqa: E731
    before = refs()
    out = {"file": os.path.basename(path), "saved_numel": sum(t.numel() for t in saved["ref"].values()),
           "saved_layout": saved.get("partitions")}
    with torch.no_grad():
        for t in callback.updater._tensors()[0]:
            t.zero_()
    resume = types.SimpleNamespace(global_step=trainer.state.global_step)
    callback.resume_from = folder
    callback.on_train_begin(args, resume, None, model=trainer.model)
    out["restored"] = all(torch.equal(a, b) for a, b in zip(refs(), before))
    # another rank's file under this rank's name; then a checkpoint of 3 processes
    swapped, bigger = os.path.join(args.output_dir, "swapped"), os.path.join(args.output_dir, "bigger")
    os.makedirs(swapped, exist_ok=True)
    os.makedirs(bigger, exist_ok=True)
    other = callback._state_path(folder, types.SimpleNamespace(process_index=(rank + 1) % world))
    shutil.copy(other, os.path.join(swapped, os.path.basename(path)))
    shutil.copy(path, os.path.join(bigger, os.path.basename(path)))
    if rank == 0:
        shutil.copy(path, os.path.join(bigger, os.path.basename(path).replace(".rank0.", f".rank{world}.")))
    dist.barrier()
    for name, where in (("other_rank", swapped), ("other_world", bigger)):
        callback.resume_from = where
        try:
            callback.on_train_begin(args, resume, None, model=trainer.model)
            out[name] = "loaded"
        except ValueError as e:
            out[name] = str(e)
    out["unchanged_after_refusals"] = all(torch.equal(a, b) for a, b in zip(refs(), before))
    return out


def zero3_local(updater):
    """This rank's reference partitions (what the update wrote), to compare with the gathered parameters."""
    refs, _, names = updater._partitions()
    return {n: r.detach().clone() for n, r in zip(names, refs)}


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
