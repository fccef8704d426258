"""Held-out images and the validation loss's fixed draws.

The validation loss is the training objective on images the run never trains on, at fixed
timesteps with fixed noise, so two points of a curve (and two runs, whatever their seed or
optimizer) differ only by the model. Which images are held out is fixed too: the same split
for every seed, so runs of one concept are scored on the same images.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError
from .data import Example

VALIDATION_TIMESTEPS = 4  # per image: the centres of 4 equal slices of the noise schedule
_SPLIT_SEED = 20240308  # the split's own seed: not the run's, so every run holds out the same


def split_examples(
    examples: list[Example], fraction: float, *, where: str
) -> tuple[list[Example], list[Example]]:
    """(training, held out): round(fraction * n) images, at least one, chosen once for the
    folder (a fixed seed over the sorted names), at least one left to train on.

    Raises:
        UserError: fewer than two images, so there is nothing to hold out.
    """
    if fraction <= 0:
        return list(examples), []
    n = len(examples)
    if n < 2:
        raise UserError(
            f"{where}: validation_split {fraction:g} holds out images, but the concept has "
            f"{n}; add images, pass validation_data=FOLDER, or set validation_split=0"
        )
    count = min(n - 1, max(1, round(fraction * n)))
    chosen = set(np.random.default_rng(_SPLIT_SEED).permutation(n)[:count].tolist())
    training = [e for i, e in enumerate(examples) if i not in chosen]
    return training, [e for i, e in enumerate(examples) if i in chosen]


def validation_timesteps(num_train_timesteps: int) -> torch.Tensor:
    """(VALIDATION_TIMESTEPS,) int64: 125, 375, 625, 875 of SD's 1000."""
    step = num_train_timesteps / VALIDATION_TIMESTEPS
    return torch.tensor([math.floor((j + 0.5) * step) for j in range(VALIDATION_TIMESTEPS)])


def validation_noise(index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(VALIDATION_TIMESTEPS, *shape) normal draws of held-out image ``index``; the same in
    every run."""
    gen = torch.Generator().manual_seed(_SPLIT_SEED + 7919 * index)
    return torch.randn((VALIDATION_TIMESTEPS, *shape), generator=gen)
