"""Checkpoints: atomic saves (temporary directory, fsync, rename), rotation, weights in and out, RNG
state, and resume.

    output_dir/checkpoint-<step>/   model.safetensors + config + tokenizer (loads with from_pretrained),
                                    reference/, trainer_state.pt (+ .json), rng_state_<rank>.pt
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil

import torch

from .model_parts import tied_parameter_names
from .output_dir import CHECKPOINT_RE, OutputDirError, rotate_checkpoints

_log = logging.getLogger("fasttrdpo")


# --- weights --------------------------------------------------------------------------------------------

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
    missing = set(missing) - tied_parameter_names(model)
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


# --- finding checkpoints ----------------------------------------------------------------------------

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


# --- durability -----------------------------------------------------------------------------------------

def fsync_tree(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- RNG ------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# --- save / rotate / load -------------------------------------------------------------------------------

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoint is intact."""


@contextlib.contextmanager
def _quiet_progress_bars():
    """transformers' "Writing model shards" bar would cut through the training bar and the records."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def read_state_json(path: str) -> dict:
    """A checkpoint's trainer_state.json ({} if it has none)."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_checkpoint(trainer) -> str:
    """Write output_dir/checkpoint-<step> of `trainer` atomically: everything goes to a temporary
    directory that is renamed into place once complete (and fsynced), so a kill at any moment leaves the
    previous checkpoint intact and never a partial one under a checkpoint-<step> name. An OSError while
    writing (disk full) removes the temporary directory and raises `CheckpointWriteError`."""
    c = trainer.config
    name = f"checkpoint-{trainer.global_step}"
    final = os.path.join(c.output_dir, name)
    tmp = os.path.join(c.output_dir, f".tmp-{name}")
    try:
        return _save_checkpoint(trainer, final, tmp)
    except OSError as e:
        if trainer.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what it took; the previous checkpoints are untouched
        raise CheckpointWriteError(e.errno, f"could not write {name} in {c.output_dir}: {e.strerror or e} "
                                   "(the previous checkpoint is intact)") from e


def _save_checkpoint(trainer, final: str, tmp: str) -> str:
    c = trainer.config
    if trainer.is_main:
        os.makedirs(c.output_dir, exist_ok=True)
        if os.path.exists(final):
            owner = read_state_json(final).get("run_id")
            if owner is not None and owner != trainer.run_id:
                raise OutputDirError(f"{final} belongs to run {owner}, not to this run ({trainer.run_id}): "
                                     "not replacing it")
        for leftover in os.listdir(c.output_dir):  # debris of a save or a deletion cut by a kill
            if leftover.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                shutil.rmtree(os.path.join(c.output_dir, leftover), ignore_errors=True)
        os.makedirs(tmp)
    trainer._barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{trainer.rank}.pt"))
    # this rank's metric vectors since the last training record: the first record after a resume
    # averages the same steps as the uninterrupted run's
    torch.save({"steps": [t.detach().cpu() for t in trainer._window], "seconds": trainer._window_seconds},
               os.path.join(tmp, f"log_window_{trainer.rank}.pt"))
    sharded = getattr(trainer, "sharded", None) is not None
    if sharded:  # FSDP2: every rank writes its shards (fasttrdpo.training.sharded_checkpoint)
        from .sharded_checkpoint import save_tensors

        save_tensors(trainer, tmp)
    if trainer.is_main:
        if not sharded:
            with _quiet_progress_bars():
                if getattr(trainer, "lora", None) is not None:  # adapters only (fasttrdpo.training.lora)
                    trainer.lora.save_checkpoint_weights(trainer, tmp)
                else:
                    save_weights(trainer.model, tmp)
                    save_weights(trainer.ref_model, os.path.join(tmp, "reference"))
        # every model folder is self-contained: `from_pretrained(folder)` finds its tokenizer
        trainer.tokenizer.save_pretrained(tmp)
        if getattr(trainer, "lora", None) is None:
            trainer.tokenizer.save_pretrained(os.path.join(tmp, "reference"))
        state = {
            "run_id": trainer.run_id,
            "run_name": c.run_name,
            "run_info": trainer.run_info,
            "global_step": trainer.global_step,
            "total_steps": trainer.total_steps,
            "data_position": {"epoch": trainer.global_step // trainer.steps_per_epoch,
                              "batch_in_epoch": trainer.global_step % trainer.steps_per_epoch,
                              "global_batch_size": trainer.global_batch_size},
            "optimizer": None if sharded else trainer.optimizer.state_dict(),  # sharded: in sharded/
            "sharded": sharded,
            "scheduler": trainer.scheduler.state_dict(),
            "schedule": trainer.schedule.state_dict(trainer.last_lr) if trainer.schedule is not None else None,
            # the reference weights are saved apart (reference/)
            "updater": trainer.updater.state_dict(ref_weights=False) if trainer.updater is not None else None,
            "ref_updates": trainer.ref_updates,
            "num_tokens": trainer.num_tokens,
            "world_size": trainer.world_size,
            "config": c.to_dict(),
        }
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({k: state[k] for k in ("run_id", "run_name", "run_info", "global_step", "total_steps",
                                             "data_position", "ref_updates", "num_tokens", "world_size", "sharded",
                                             "config")}, f, indent=1)
    trainer._barrier()
    if trainer.is_main:
        fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): move the old one away first
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        fsync_dir(c.output_dir)
        shutil.rmtree(final + ".old", ignore_errors=True)
        rotate_checkpoints(c.output_dir, c.save_total_limit, trainer.run_id)
    trainer._barrier()
    return final


def load_checkpoint(trainer, path: str) -> None:
    """Restore policy, reference, optimizer, scheduler, updater, RNG, data position and the logging
    window of `trainer`. tau, alpha, max_steps and the schedule may differ from the checkpoint's: the
    change is logged (a changed length continues the learning rate, see fasttrdpo.training.schedule)."""
    if path == "latest":
        found = find_latest_checkpoint(trainer.config.output_dir)
        if found is None:
            raise FileNotFoundError(f"resume 'latest': no checkpoint in {trainer.config.output_dir}")
        path = found
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"{path} is not a fasttrdpo checkpoint (no trainer_state.pt)")
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location=trainer.device, weights_only=False)
    if state["data_position"]["global_batch_size"] != trainer.global_batch_size:
        raise ValueError(f"checkpoint was written with global batch {state['data_position']['global_batch_size']}, "
                         f"this run has {trainer.global_batch_size}: the data position would not match")
    if state.get("sharded") and getattr(trainer, "sharded", None) is None:
        raise ValueError(f"{path} is a sharded (fsdp) checkpoint: resume it with fsdp=True, or turn it into "
                         "plain folders with `fasttrdpo export`")
    if state.get("sharded") and state.get("world_size") != trainer.world_size:  # untested: refused
        raise ValueError(f"{path} was saved by {state.get('world_size')} FSDP ranks; this run has "
                         f"{trainer.world_size}: resume with the same number of processes")
    saved_updater = state["updater"]
    if trainer.updater is not None and saved_updater is not None:
        # strict=False: this run's tau/alpha win (validated before anything is written)
        trainer.updater.load_state_dict(saved_updater, strict=False)
    if getattr(trainer, "sharded", None) is not None:
        from .sharded_checkpoint import load_tensors

        load_tensors(trainer, path)
    elif getattr(trainer, "lora", None) is not None:
        trainer.lora.load_checkpoint_weights(trainer, path)
        trainer.optimizer.load_state_dict(state["optimizer"])
    else:
        load_weights(trainer.model, path)
        load_weights(trainer.ref_model, os.path.join(path, "reference"))
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.global_step = state["global_step"]
    trainer.last_lr = (state.get("schedule") or {}).get("last_lr")
    notices = []
    if "num_tokens" in state:
        trainer.num_tokens = state["num_tokens"]
    else:  # a checkpoint written before num_tokens was logged: the count is a function of the data order
        trainer.num_tokens = sum(trainer._step_tokens(s) for s in range(trainer.global_step))
        notices.append(f"resume: num_tokens {trainer.num_tokens} recounted from the data order (not in the checkpoint)")
    if trainer.updater is not None and saved_updater is not None:
        for key in ("tau", "alpha"):
            old, new = saved_updater[key], getattr(trainer.updater, key)
            if float(old) != float(new):
                notices.append(f"resume: {key} {old} -> {new} from step {trainer.global_step} on")
    if trainer.schedule is not None and state.get("schedule"):
        notice = trainer.schedule.restore(state["schedule"], trainer.global_step, trainer.scheduler.base_lrs[0])
        if notice:
            notices.append(notice)
        # the next step's rate under the (possibly continued) schedule
        for group, base_lr in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
            group["lr"] = base_lr * trainer.schedule(trainer.global_step)
        trainer.scheduler._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
    old_total = state.get("total_steps")
    if old_total is not None and old_total != trainer.total_steps and trainer.schedule is None:
        notices.append(f"resume: max_steps {old_total} -> {trainer.total_steps}")
    rng_file = os.path.join(path, f"rng_state_{trainer.rank}.pt")
    if not os.path.exists(rng_file):
        rng_file = os.path.join(path, "rng_state_0.pt")
    set_rng_state(torch.load(rng_file, weights_only=False))
    window_file = os.path.join(path, f"log_window_{trainer.rank}.pt")
    if os.path.exists(window_file):
        window = torch.load(window_file, weights_only=False)
        trainer._window = [t.to(trainer.device) for t in window["steps"]]
        trainer._window_seconds = float(window["seconds"])
    if trainer.is_main:
        trainer.history = truncate_metrics(trainer.metrics_path, trainer.global_step)
        _log.info("resumed from %s at step %d (run %s)", path, trainer.global_step, trainer.run_id)
        for notice in notices:
            _log.info(notice)


def truncate_metrics(metrics_path: str, step: int) -> list[dict]:
    """Drop records logged after the checkpoint (the killed run got further than it saved); returns
    the records kept."""
    kept = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if rec.get("step", 0) <= step:
                    kept.append(rec)
    with open(metrics_path, "w") as f:
        for rec in kept:
            f.write(json.dumps(rec) + "\n")
    return kept
