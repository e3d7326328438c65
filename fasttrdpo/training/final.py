"""The final model: `output_dir/final/`, what people load and upload.

    final/               the policy in save_pretrained format (+ the tokenizer): `from_pretrained(final)`
                         (with LoRA: the adapter, `PeftModel.from_pretrained(base, final)`, or with
                         save_merged=True full weights, `AutoModelForCausalLM.from_pretrained(final)`)
    final/reference/     with save_reference=True: the reference as it stands at the end, same format
    final/fasttrdpo_final.json   run id and name, step, reference updates, format

It follows the output-directory rules (fasttrdpo.training.output_dir): final/ is not "another run" (a new run
may start beside it and replaces it at its end, with a notice naming the run it replaces), it is removed
with the run's outputs by overwrite_output_dir, and it is written to `.tmp-final/`, fsynced and renamed into
place, so a kill leaves the previous final/ (or none) and never a partial one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from .checkpoint import _quiet_progress_bars, fsync_dir, fsync_tree, save_weights

_log = logging.getLogger("fasttrdpo")

FINAL_DIR = "final"
TMP_DIR = ".tmp-final"
INFO_FILE = "fasttrdpo_final.json"


def read_info(output_dir: str) -> dict:
    try:
        with open(os.path.join(output_dir, FINAL_DIR, INFO_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_current(trainer) -> bool:
    """final/ exists and was written by this run at its current step."""
    info = read_info(trainer.config.output_dir)
    return info.get("run_id") == trainer.run_id and info.get("global_step") == trainer.global_step


def save_final(trainer) -> str:
    c = trainer.config
    final = os.path.join(c.output_dir, FINAL_DIR)
    if trainer.is_main:
        tmp = os.path.join(c.output_dir, TMP_DIR)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save cut by a kill
        os.makedirs(tmp)
        with _quiet_progress_bars():
            if getattr(trainer, "sharded", None) is not None:
                # FSDP2: rank 0 gathers the step's sharded checkpoint from disk (one full policy and reference
                # in its host memory, as `fasttrdpo export` does); the loop saved that checkpoint just before
                from .sharded_checkpoint import export_checkpoint

                os.rmdir(tmp)
                export_checkpoint(os.path.join(c.output_dir, f"checkpoint-{trainer.global_step}"), tmp)
                if not c.save_reference:
                    shutil.rmtree(os.path.join(tmp, "reference"))
            elif getattr(trainer, "lora", None) is not None:
                trainer.lora.save_final(tmp, trainer.ref_model, c.save_reference)
            else:
                save_weights(trainer.model, tmp)
                if c.save_reference:
                    save_weights(trainer.ref_model, os.path.join(tmp, "reference"))
        trainer.tokenizer.save_pretrained(tmp)
        if c.save_reference:
            trainer.tokenizer.save_pretrained(os.path.join(tmp, "reference"))
        info = {"run_id": trainer.run_id, "run_name": c.run_name, "global_step": trainer.global_step,
                "ref_updates": trainer.ref_updates, "reference": bool(c.save_reference),
                "format": ("full" if getattr(trainer, "lora", None) is None or c.save_merged else "lora_adapter")}
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
        fsync_tree(tmp)
        old = read_info(c.output_dir)
        if os.path.exists(final):
            if old.get("run_id") not in (None, trainer.run_id):
                _log.warning("replacing %s of run %s (step %s) with this run's final model", final, old["run_id"],
                             old.get("global_step"))
            trash = os.path.join(c.output_dir, ".trash-final")
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(c.output_dir)
    trainer._barrier()
    return final
