"""The rules of an output directory (later features follow them):

1. One writer at a time. The writing process (rank 0) holds an `flock` on `<output_dir>/.fasttrdpo.lock`
   for as long as it trains; a second process that tries to write there gets `OutputDirError` at once.
   The kernel drops the lock when the holder exits, even on kill -9, so a stale lock file never blocks.
2. Every run has an id (`run_id`, a fresh uuid per new run; a resumed run keeps its checkpoint's), written
   into each checkpoint's `trainer_state.json` / `.pt` together with `run_name`.
3. A new run (not `--resume`) refuses a directory that already holds `checkpoint-*` folders (they belong
   to another run): `--overwrite-output-dir` deletes that run's outputs first, `--resume` continues it.
   The lock file, `final/` and loose files (metrics.jsonl, plots) do not count as another run.
4. Rotation (`save_total_limit`) deletes only this run's checkpoints, and a save never replaces another
   run's checkpoint of the same step.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil

_log = logging.getLogger("fasttrdpo")

LOCK_NAME = ".fasttrdpo.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# what a run writes besides its checkpoints: removed with them by overwrite_output_dir
RUN_FILES = ("metrics.jsonl", "final_metrics.json", "training_curves.png")
RUN_DIRS = ("final",)


class OutputDirError(RuntimeError):
    """The output directory cannot be used as asked (in use, or holding another run's checkpoints)."""


class OutputDirLock:
    """An exclusive, non-blocking `flock` on `<output_dir>/.fasttrdpo.lock`, held until `release()` or the
    end of the process (the kernel releases it on any exit, kill -9 included)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        if self._fd is not None:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputDirError(f"{os.path.dirname(self.path)} is in use by another fasttrdpo process (pid "
                                 f"{holder} holds {LOCK_NAME}): wait for it or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (it is harmless)
            self._fd = None


def checkpoint_run(path: str) -> dict:
    """{"run_id", "run_name"} recorded in a checkpoint's trainer_state.json ({} when absent/unreadable)."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: state[k] for k in ("run_id", "run_name") if k in state}


def checkpoints(output_dir: str) -> dict[int, str]:
    """{step: path} of every checkpoint-<step> folder in output_dir (complete or not)."""
    if not os.path.isdir(output_dir):
        return {}
    found = {}
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found[int(m.group(1))] = os.path.join(output_dir, name)
    return found


def _names(found: dict[int, str]) -> str:
    return ", ".join(os.path.basename(found[s]) for s in sorted(found)[:4]) + (", ..." if len(found) > 4 else "")


def refuse_other_runs(output_dir: str) -> None:
    """Read only: raise OutputDirError when output_dir holds checkpoints (a new run without overwrite must not
    start there). The CLI calls it before loading anything; `check_new_run` again under the lock."""
    found = checkpoints(output_dir)
    if found:
        runs = {checkpoint_run(p).get("run_id") for p in found.values()} - {None}
        which = f"run {sorted(runs)[0]}" if len(runs) == 1 else "another run"
        raise OutputDirError(f"{output_dir} holds checkpoints of {which} ({_names(found)}): pass "
                             "--overwrite-output-dir to replace them, or --resume to continue that run")


def check_new_run(output_dir: str, *, overwrite: bool) -> list[str]:
    """Before a new (not resumed) run writes anything: refuse a directory with another run's checkpoints,
    or, with `overwrite`, delete that run's outputs. Returns the notices to log."""
    found = checkpoints(output_dir)
    if not found:
        return []
    if not overwrite:
        refuse_other_runs(output_dir)
    remove_run_outputs(output_dir)
    return [f"overwrite_output_dir: removed the previous run's outputs in {output_dir} ({_names(found)})"]


def remove_run_outputs(output_dir: str) -> None:
    """Delete checkpoints (renamed away first, so a half-deleted one never looks complete), debris of
    interrupted saves, final/ and the run's record files. The lock file stays."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if CHECKPOINT_RE.match(name) or name in RUN_DIRS:
            trash = os.path.join(output_dir, f".trash-{name}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif name.startswith((".tmp-checkpoint-", ".trash-", ".tmp-final")):
            shutil.rmtree(path, ignore_errors=True)
        elif name in RUN_FILES:
            os.remove(path)


def rotate_checkpoints(output_dir: str, limit: int | None, run_id: str | None) -> None:
    """Keep this run's `limit` highest-step checkpoints; never touch another run's (or an unlabelled one)."""
    if limit is None:
        return
    mine = sorted(step for step, path in checkpoints(output_dir).items()
                  if run_id is not None and checkpoint_run(path).get("run_id") == run_id)
    for step in mine[:-limit]:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        trash = os.path.join(output_dir, f".trash-checkpoint-{step}")
        os.rename(path, trash)  # atomic: a half-deleted directory never looks like a checkpoint
        shutil.rmtree(trash, ignore_errors=True)
