"""Checkpoints of a training run, and resuming from the latest complete one.

A checkpoint holds exactly what the loop cannot recompute: the trained tensors, the optimizer's
state (SGD-SaI's scales included), the lr schedule's and the GradScaler's. Every random draw of a
step comes from (seed, step), so with these a resumed run continues as the uninterrupted one
would have (bitwise on the CPU, for the same thread count).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError, first_line
from ..files.run_dir import Checkpoint, RunDir
from ..fsutil import atomic_dir
from .schedule import replan_lr_scheduler


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: references to the live objects of a run."""

    trainable: Mapping[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer  # the torch optimizer itself, not accelerate's wrapper
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None  # fp16 only


# how torch.save's zip writer reports a write that failed (disk full: "file write failed", or
# at 4 KB free "[enforce fail at inline_container.cc:...] unexpected pos ...")
_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|unexpected pos")


def save_checkpoint(run_dir: RunDir, step: int, state: TrainingState, *, keep: int) -> Checkpoint:
    """Write ``checkpoints/step-NNNNNN/`` under a temporary name, rename it when complete, and
    keep only the newest ``keep`` checkpoints.

    Raises:
        UserError: the folder cannot be written (disk full, read-only, quota); the previous
            checkpoints are left as they were.
    """
    final = run_dir.checkpoint(step)
    try:
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
    except (OSError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, RuntimeError) and not _WRITE_FAILURE.search(str(exc)):
            raise  # torch.save reports a failed write so; any other RuntimeError is a bug
        previous = run_dir.latest_checkpoint()
        kept = f"; {previous[1].path} is intact" if previous else ""
        raise UserError(
            f"cannot write the checkpoint {final.path} ({first_line(exc)}){kept}. Free disk "
            f"space or give a writable --output-dir, then resume with --resume {run_dir.path}"
        ) from None
    # the oldest complete ones, and the temporary folders of writes a kill interrupted
    stale = [c.path for c in run_dir.checkpoint_folders()[:-keep]]
    for path in stale + run_dir.stale_checkpoint_temps():
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: RunDir, state: TrainingState) -> int:
    """Restore ``state`` from the newest complete checkpoint that reads back; return its step
    (0, ``state`` untouched, when the run has no checkpoint yet: it was stopped before one).

    A checkpoint whose files are truncated or corrupt is skipped with a warning naming it, and
    the next older one is tried; once one restores, the skipped ones are set aside as
    ``.step-NNNNNN.unreadable`` (kept for inspection; no longer a checkpoint, so pruning can
    never keep one in place of a good one). When none restores, nothing is moved.

    Raises:
        UserError: checkpoints none of which reads back, or one whose tensors are not this
            run's.
    """
    skipped: list[Checkpoint] = []
    for step, checkpoint in run_dir.complete_checkpoints():
        try:
            saved = _read(checkpoint, with_scaler=state.scaler is not None)
        except _UNREADABLE as exc:
            print(
                f"warning: skipping {checkpoint.path}: unreadable ({first_line(exc)}); "
                "trying an older checkpoint",
                file=sys.stderr,
            )
            skipped.append(checkpoint)
            continue
        _restore(state, saved, checkpoint, run_dir)
        for bad in skipped:  # kept for inspection, no longer a checkpoint (pruning, --resume)
            aside = bad.path.with_name(f".{bad.path.name}.unreadable")
            with contextlib.suppress(OSError):
                os.replace(bad.path, aside)
                print(f"note: {bad.path} set aside as {aside.name}", file=sys.stderr)
        return step
    if not skipped:  # stopped before its first checkpoint: the run starts again from step 0
        return 0
    unreadable = ", ".join(c.path.name for c in skipped)
    raise UserError(
        f"{run_dir.checkpoints_dir} has no complete checkpoint to resume from (unreadable: "
        f"{unreadable}); start a new run instead"
    )


def restore_latest(run_dir: RunDir, state: TrainingState, *, max_steps: int) -> int:
    """Restore ``state`` from the latest checkpoint (``load_latest_checkpoint``) for a run of
    ``max_steps``, its lr schedule re-planned when the length changed; returns the step.

    Raises:
        UserError: no checkpoint to resume, one past ``max_steps``, or a schedule that has
            already decayed to 0 for a longer run.
    """
    step = load_latest_checkpoint(run_dir, state)
    if step > max_steps:
        raise UserError(
            f"{run_dir.path} is at step {step}, past --max-steps {max_steps}; give "
            f"--max-steps {step} or more"
        )
    try:
        replan_lr_scheduler(state.lr_scheduler, step, max_steps)  # training/schedule
    except ValueError as exc:
        raise UserError(
            f"{run_dir.path}: {exc}; keep --max-steps {step}, or train the longer run as a new "
            "one (with its own length, or --set lr_scheduler=constant)"
        ) from None
    return step


# what a damaged file raises: safetensors' error, torch.load's (pickle, zip), short reads
_UNREADABLE = (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError)


def _read(checkpoint: Checkpoint, *, with_scaler: bool) -> dict[str, Any]:
    """Every file of a checkpoint, in memory: nothing is restored unless all of them read."""
    saved = {
        "trainable": load_file(str(checkpoint.trainable)),
        "optimizer": torch.load(checkpoint.optimizer, weights_only=True, map_location="cpu"),
        "lr_scheduler": torch.load(checkpoint.lr_scheduler, weights_only=True),
    }
    if with_scaler and checkpoint.scaler.is_file():
        saved["scaler"] = torch.load(checkpoint.scaler, weights_only=True)
    return saved


def _restore(
    state: TrainingState, saved: dict[str, Any], checkpoint: Checkpoint, run_dir: RunDir
) -> None:
    weights = saved["trainable"]
    mismatched = set(state.trainable) ^ set(weights)
    if mismatched:
        raise UserError(
            f"{checkpoint.path}: the checkpoint does not match this run's trainable parameters "
            f"(e.g. {sorted(mismatched)[0]}); was {run_dir.run_yaml.name} edited?"
        )
    with torch.no_grad():
        for name, p in state.trainable.items():
            p.copy_(weights[name])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if "scaler" in saved:
        state.scaler.load_state_dict(saved["scaler"])
