"""Sharded checkpoints of an FSDP2 run (`torch.distributed.checkpoint`), and their export.

    checkpoint-<step>/   sharded/ (DCP: policy, reference, optimizer shards of every rank), config.json
                         (+ tokenizer) of the policy, reference/config.json, trainer_state.pt (+ .json,
                         "sharded": true), rng_state_<rank>.pt, log_window_<rank>.pt

The directory is written and renamed into place by `fasttrdpo.training.checkpoint.save_checkpoint`
(atomic: a kill -9 at any moment leaves only a `.tmp-checkpoint-*` that the next save removes); this
module writes and reads the tensors. `export_checkpoint` turns one into plain `save_pretrained`
folders (policy, reference/) in one process: `fasttrdpo export CHECKPOINT OUT_DIR`.
"""
from __future__ import annotations

import os

import torch

SHARDED_DIR = "sharded"
DTYPE_FILE = "weights_dtype.txt"  # the dtype of the saved weights (config.json may say another)


def is_sharded(path: str) -> bool:
    return os.path.isdir(os.path.join(path, SHARDED_DIR))


def _state(trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # module.state_dict() of a fully_shard-ed model holds its DTensor shards under the model's own names
    return {"policy": trainer.model.state_dict(), "reference": trainer.ref_model.state_dict(),
            "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer)}


def save_tensors(trainer, folder: str) -> None:
    """Every rank writes its shards of policy, reference and optimizer state into folder/sharded (a
    collective); rank 0 adds the models' config.json (what `export` rebuilds them from)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(trainer), checkpoint_id=os.path.join(folder, SHARDED_DIR))
    if trainer.is_main:
        for model, sub in ((trainer.model, ""), (trainer.ref_model, "reference")):
            model.config.save_pretrained(os.path.join(folder, sub))
            with open(os.path.join(folder, sub, DTYPE_FILE), "w") as f:
                f.write(str(next(model.parameters()).dtype).replace("torch.", ""))


def load_tensors(trainer, path: str) -> None:
    """Load policy, reference and optimizer shards into the sharded trainer (any world size: DCP
    reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not is_sharded(path):
        raise ValueError(f"{path} is not a sharded (fsdp) checkpoint: resume it without --fsdp")
    state = _state(trainer)  # initialises the optimizer's state so that DCP has tensors to load into
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR))
    trainer.model.load_state_dict(state["policy"])
    trainer.ref_model.load_state_dict(state["reference"])
    set_optimizer_state_dict(trainer.model, trainer.optimizer, optim_state_dict=state["optimizer"])


def export_checkpoint(path: str, out_dir: str) -> str:
    """Write out_dir (policy) and out_dir/reference as plain `save_pretrained` folders, from a sharded
    checkpoint, in this one process (DCP gathers the shards of every rank)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_sharded(path):
        raise ValueError(f"{path} is not a sharded (fsdp) checkpoint: its folders already load with "
                         "from_pretrained")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"out_dir {out_dir} exists and is not empty")
    models = {}
    for key, sub in (("policy", ""), ("reference", "reference")):
        with open(os.path.join(path, sub, DTYPE_FILE)) as f:
            dtype = getattr(torch, f.read().strip())
        config = AutoConfig.from_pretrained(os.path.join(path, sub))
        with torch.random.fork_rng(devices=[]):
            models[key] = AutoModelForCausalLM.from_config(config).to(dtype)
    state = {k: m.state_dict() for k, m in models.items()}
    # no_dist: this one process reads every rank's shards (also when called by rank 0 of a running job)
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR), no_dist=True)
    for key, sub in (("policy", ""), ("reference", "reference")):
        models[key].load_state_dict(state[key])
        models[key].save_pretrained(os.path.join(out_dir, sub), safe_serialization=True)
    try:  # the tokenizer, when the checkpoint has one
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok.save_pretrained(out_dir)
        tok.save_pretrained(os.path.join(out_dir, "reference"))
    except OSError:  # no tokenizer saved
        pass
    return out_dir
