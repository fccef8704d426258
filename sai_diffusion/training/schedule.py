"""The learning-rate schedule of a run, and what resuming with another length does to it.

Shapes (after ``warmup_steps`` of linear warm-up), as diffusers' ``get_scheduler`` computes
them: ``constant``, ``linear`` (to 0 at ``max_steps``), ``cosine`` (half a cosine to 0). The
factor of step s is a pure function of the schedule's fields, and torch's ``LambdaLR`` saves
the fields of a callable object in its ``state_dict``: a checkpoint restores the plan.

Resuming with another ``--max-steps`` re-plans the rest without a jump: from the resume step r
the decay restarts at the factor the run had reached, f(r), and follows the same shape to 0 at
the new end (linear from f(r); a half cosine scaled by f(r)). A constant schedule is unchanged,
and a warm-up still under way at r ends as first planned (warm-up does not depend on the
length). Without the re-plan, a linear schedule of 500 steps resumed at step 400 for 1000 would
jump from 0.2 to 0.6 of the lr.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


class LRSchedule:
    """The lr factor of each step: ``LambdaLR(optimizer, LRSchedule(...))``."""

    def __init__(self, kind: str, *, warmup_steps: int, max_steps: int) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        # the decay runs from (start, start_factor) to (max_steps, 0)
        self.start = warmup_steps
        self.start_factor = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        if self.kind == "constant":
            return 1.0
        span = float(max(1, self.max_steps - self.start))
        if self.kind == "linear":
            return self.start_factor * max(0.0, float(self.max_steps - step) / span)
        progress = float(step - self.start) / span
        return self.start_factor * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def replan(self, step: int, max_steps: int) -> None:
        """Continue from ``step`` (the resume point) to a new ``max_steps`` (module docstring)."""
        if self.kind != "constant" and step > self.start:
            self.start_factor, self.start = self(step), step
        self.max_steps = max_steps


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, *, warmup_steps: int, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """One ``LRSchedule`` shared by every param group (each keeps its own base lr)."""
    schedule = LRSchedule(kind, warmup_steps=warmup_steps, max_steps=max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def replan_lr_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int, max_steps: int):
    """Re-plan a restored scheduler for a new run length (no-op when the length is the same).

    Older checkpoints (diffusers' schedules, whose functions LambdaLR cannot save) restore
    only the step; their plan is rebuilt from the settings, as it was before.

    Raises:
        ValueError: a longer run whose decay has already reached 0 at ``step`` (it would train
            on at lr 0).
    """
    schedule = scheduler.lr_lambdas[0]
    if isinstance(schedule, LRSchedule) and schedule.max_steps != max_steps:
        if max_steps > step and schedule.kind != "constant" and schedule(step) <= 1e-6:
            raise ValueError(
                f"the {schedule.kind} lr schedule reached 0 at step {step}, so "
                f"{max_steps - step} more steps would train at lr 0"
            )
        schedule.replan(step, max_steps)
