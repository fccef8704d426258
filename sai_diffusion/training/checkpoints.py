"""Checkpoints of a training run, and resuming from the latest complete one.

A checkpoint holds exactly what the loop cannot recompute: the trained tensors, the optimizer's
state (SGD-SaI's scales included), the lr schedule's and the GradScaler's. Every random draw of a
step comes from (seed, step), so with these a resumed run continues as the uninterrupted one
would have (bitwise on the CPU, for the same thread count).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files.run_dir import Checkpoint, RunDir
from ..fsutil import atomic_dir


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: references to the live objects of a run."""

    trainable: Mapping[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer  # the torch optimizer itself, not accelerate's wrapper
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None  # fp16 only


def save_checkpoint(run_dir: RunDir, step: int, state: TrainingState, *, keep: int) -> Checkpoint:
    """Write ``checkpoints/step-NNNNNN/`` under a temporary name, rename it when complete, and
    keep only the newest ``keep`` checkpoints."""
    final = run_dir.checkpoint(step)
    with atomic_dir(final.path) as tmp:
        staged = Checkpoint(tmp)
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in state.trainable.items()},
            str(staged.trainable),
        )
        torch.save(state.optimizer.state_dict(), staged.optimizer)
        torch.save(state.lr_scheduler.state_dict(), staged.lr_scheduler)
        if state.scaler is not None:
            torch.save(state.scaler.state_dict(), staged.scaler)
        staged.write_state(step)  # last: a folder with state.json is a complete checkpoint
    for stale in run_dir.checkpoint_folders()[:-keep]:
        shutil.rmtree(stale.path, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: RunDir, state: TrainingState) -> int:
    """Restore ``state`` from the newest complete checkpoint; return its step.

    Raises:
        UserError: no complete checkpoint, or one whose tensors are not this run's.
    """
    latest = run_dir.latest_checkpoint()
    if latest is None:
        raise UserError(
            f"{run_dir.checkpoints_dir} has no complete checkpoint to resume from; "
            "start a new run instead"
        )
    step, checkpoint = latest
    weights = load_file(str(checkpoint.trainable))
    mismatched = set(state.trainable) ^ set(weights)
    if mismatched:
        raise UserError(
            f"{checkpoint.path}: the checkpoint does not match this run's trainable parameters "
            f"(e.g. {sorted(mismatched)[0]}); was {run_dir.run_yaml.name} edited?"
        )
    with torch.no_grad():
        for name, p in state.trainable.items():
            p.copy_(weights[name])
    state.optimizer.load_state_dict(
        torch.load(checkpoint.optimizer, weights_only=True, map_location="cpu")
    )
    state.lr_scheduler.load_state_dict(torch.load(checkpoint.lr_scheduler, weights_only=True))
    if state.scaler is not None and checkpoint.scaler.is_file():
        state.scaler.load_state_dict(torch.load(checkpoint.scaler, weights_only=True))
    return step
