"""Where the training records go besides metrics.jsonl: TensorBoard and/or Weights & Biases (`report_to`).

Each record the trainer writes to metrics.jsonl is sent, unchanged in value, to every target, under the
names Hugging Face's Trainer (and so TRL) uses there: a key `eval_x` becomes `eval/x`, any other key `k`
becomes `train/k` (`train/loss`, `train/rewards/accuracies`, `train/entropy`, `eval/loss`, ...), at the
record's `step`. Only numbers are sent (bools and strings are not scalars).

The packages are optional extras: `pip install 'fasttrdpo[tensorboard]'` / `'fasttrdpo[wandb]'`. A target
whose package is missing fails at construction (before any training), naming the extra to install.
TensorBoard writes under `<output_dir>/runs/<run id>` (a resumed run appends to the same directory);
wandb logs to the project `$WANDB_PROJECT` (default "fasttrdpo") with the run id as the wandb run id (a
resumed run continues it) and `$WANDB_MODE` as wandb reads it (offline, disabled, ...).
"""
from __future__ import annotations

import importlib.util
import os

REPORT_TARGETS = ("tensorboard", "wandb")
# target -> (module that must import, extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def normalize_report_to(value) -> list[str]:
    """report_to as given (a name, "none", or a list of names) -> the list of targets (empty for "none").
    ValueError/TypeError naming report_to on anything else."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"report_to must be a str or a list of str, got {value!r}")
    names = [n.strip().lower() for n in names]
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"report_to: 'none' cannot be combined with other targets, got {value!r}")
        return []
    unknown = [n for n in names if n not in REPORT_TARGETS]
    if unknown:
        raise ValueError(f"report_to: unknown target(s) {unknown}; choose from {list(REPORT_TARGETS)} or 'none'")
    return list(dict.fromkeys(names))  # order kept, duplicates dropped


def check_available(targets: list[str]) -> None:
    """ImportError naming the extra for each target whose package is not installed."""
    missing = [t for t in targets if importlib.util.find_spec(_NEEDS[t][0]) is None]
    if missing:
        extras = ",".join(_NEEDS[t][1] for t in missing)
        raise ImportError(f"report_to={missing} needs the package(s) {[_NEEDS[t][0] for t in missing]}: "
                          f"pip install 'fasttrdpo[{extras}]'")


def scalar_items(record: dict):
    """(name, float value) of a record's numbers under the Trainer's names (eval_x -> eval/x, k -> train/k)."""
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key
        yield name, float(value)


class Reporter:
    """Sends training records to the targets of `report_to`. Construct early (it checks the packages);
    `open(run_id, ...)` when the run starts, `log(record)` per record, `close()` at the end (idempotent)."""

    def __init__(self, report_to, output_dir: str):
        self.targets = normalize_report_to(report_to)
        check_available(self.targets)
        self.output_dir = output_dir
        self._tb = None
        self._wandb_run = None

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb_run is not None

    def open(self, run_id: str, *, run_name: str | None = None, config: dict | None = None) -> None:
        if self.active:
            return
        if "tensorboard" in self.targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = os.path.join(self.output_dir, "runs", run_id)
            self._tb = SummaryWriter(log_dir=self.tensorboard_dir)
        if "wandb" in self.targets:
            import wandb

            self._wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fasttrdpo"), id=run_id,
                                         name=run_name, resume="allow", config=config,
                                         dir=os.environ.get("WANDB_DIR", self.output_dir))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        step = int(record["step"])
        values = dict(scalar_items(record))
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({**values, "train/global_step": step}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
