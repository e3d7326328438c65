"""Learning-rate schedules: every `lr_scheduler_type` TRL / transformers accept, built by
`transformers.get_scheduler`, plus what happens to the schedule when a resumed run changes its length.

A fresh run follows `get_scheduler(name, num_warmup_steps, num_training_steps=total_steps)` exactly
(the multiplier of the base learning rate at step s is that scheduler's lambda at s). A resume that
changes `max_steps` (or the scheduler type) must not jump back to the old curve's value at that step (a
linear decay over 30 steps is at 1/3 at step 20, far above where a finished 20-step run ended):
the learning rate continues from the last rate applied, lr_last, and decays with the same shape, without
warmup, over the new remainder R = total − step:

    lr(s) = lr_last · f_{R+1}(s − step + 1),      f_n = the scheduler's multiplier over n steps

so lr(step − 1) would be lr_last exactly and a linear schedule reaches lr_last/(R+1) at the last step.
`reduce_lr_on_plateau` and `greedy` follow the evaluation loss (stepped at each evaluation, as the
transformers Trainer does) and need `eval_steps` and an eval set.
"""
from __future__ import annotations

import math

import torch

METRIC_DRIVEN = ("reduce_lr_on_plateau", "greedy")


def scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


def warmup_steps(config, total_steps: int) -> int:
    return config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)


def multiplier(name: str, warmup: int, total: int, kwargs: dict | None, base_lr: float):
    """f(step) of `transformers.get_scheduler(name, ...)`: the factor on the base learning rate (built on a
    scratch optimizer with the same base rate: `polynomial`'s lr_end is absolute, so f depends on it)."""
    from transformers import get_scheduler

    scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)  # the real optimizer is untouched
    try:
        sched = get_scheduler(name, scratch, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=dict(kwargs or {}))
    except TypeError as e:  # a keyword the scheduler does not take
        raise ValueError(f"lr_scheduler_kwargs {kwargs} do not fit lr_scheduler_type {name!r}: {e}") from None
    return sched.lr_lambdas[0]


class Schedule:
    """The LambdaLR multiplier of the run: scale · f(step − offset). A fresh run: scale 1, offset 0, f
    over total_steps with warmup. After a resume that changed the length: see the module docstring."""

    def __init__(self, config, total_steps: int):
        self.name = config.lr_scheduler_type
        self.kwargs = dict(config.lr_scheduler_kwargs or {})
        self.total_steps = total_steps
        self.warmup = warmup_steps(config, total_steps)
        self.horizon = total_steps
        self.offset = 0
        self.scale = 1.0
        self.base_lr = config.learning_rate
        self._f = multiplier(self.name, self.warmup, self.horizon, self.kwargs, self.base_lr)

    def __call__(self, step: int) -> float:
        return self.scale * self._f(step - self.offset)

    def state_dict(self, last_lr: float | None) -> dict:
        return {"name": self.name, "kwargs": self.kwargs, "total_steps": self.total_steps, "warmup": self.warmup,
                "horizon": self.horizon, "offset": self.offset, "scale": self.scale, "last_lr": last_lr}

    def restore(self, saved: dict, step: int, base_lr: float) -> str | None:
        """Take the saved schedule back when the run's length and type are unchanged; otherwise continue
        from the last learning rate applied (module docstring). Returns a notice when the schedule changed."""
        if saved["name"] == self.name and saved["total_steps"] == self.total_steps and saved["kwargs"] == self.kwargs:
            self.warmup, self.horizon, self.offset, self.scale = (saved["warmup"], saved["horizon"], saved["offset"],
                                                                  saved["scale"])
            self._f = multiplier(self.name, self.warmup, self.horizon, self.kwargs, self.base_lr)
            return None
        last = saved.get("last_lr")
        remaining = self.total_steps - step
        if last is None or remaining <= 0 or base_lr <= 0:
            return None
        self.warmup, self.horizon, self.offset = 0, remaining + 1, step - 1
        self.scale = last / base_lr
        self._f = multiplier(self.name, 0, self.horizon, self.kwargs, self.base_lr)
        return (f"resume: schedule {saved['name']} over {saved['total_steps']} steps -> {self.name} over "
                f"{self.total_steps}: the learning rate continues from {last:.4g} (the rate of step {step}) and "
                f"follows {self.name} over the remaining {remaining} steps (next: {base_lr * self(step):.4g})")
