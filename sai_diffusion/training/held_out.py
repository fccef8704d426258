"""Held-out images and the validation loss on them.

The validation loss is the training objective on images the run never trains on, at fixed
timesteps with fixed noise, so two points of a curve (and two runs, whatever their seed or
optimizer) differ only by the model. Which images are held out is fixed too: the same split
for every seed, so runs of one concept are scored on the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..files.concept_data import Example
from .inputs import EncodedImages, Inputs
from .objective import Objective
from .streams import held_out_choice, validation_noise
from .text import CaptionEncoder

VALIDATION_TIMESTEPS = 4  # per image: the centres of 4 equal slices of the noise schedule


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
    chosen = held_out_choice(n, min(n - 1, max(1, round(fraction * n))))
    training = [e for i, e in enumerate(examples) if i not in chosen]
    return training, [e for i, e in enumerate(examples) if i in chosen]


def validation_timesteps(num_train_timesteps: int) -> torch.Tensor:
    """(VALIDATION_TIMESTEPS,) int64: 125, 375, 625, 875 of SD's 1000."""
    step = num_train_timesteps / VALIDATION_TIMESTEPS
    return torch.tensor([math.floor((j + 0.5) * step) for j in range(VALIDATION_TIMESTEPS)])


class HeldOut:
    """The validation loss's images (``examples``), encoded once (posterior mean of the centre
    crop, at each one's bucket size with buckets; scaled), with their masks and captions."""

    def __init__(self, examples: Sequence[Example], encoded: EncodedImages, *, scale: float,
                 num_timesteps: int) -> None:  # fmt: skip
        self.examples = list(examples)
        self.latents = [mean[:1] * scale for mean in encoded.mean]  # (1, C, h, w) each
        self.masks = [mask[:1] for mask in encoded.mask]  # (1, 1, H, W) each
        self.time_ids = [ids[:1] for ids in encoded.time_ids]  # (1, 6) each
        self.captions = [e.caption for e in self.examples]
        self.timesteps = validation_timesteps(num_timesteps)

    @torch.no_grad()
    def loss(self, objective: Objective, unet: nn.Module, text: CaptionEncoder) -> float:
        """The objective without the attention penalty, on every held-out image at every
        validation timestep with the image's fixed noise, averaged over images and timesteps.
        Call it with the modules in eval mode (and, under DDP, on every process)."""
        n = len(self.timesteps)
        losses = []
        for i, (latents, mask, time_ids) in enumerate(
            zip(self.latents, self.masks, self.time_ids, strict=True)
        ):
            inputs = Inputs(
                latents=latents.expand(n, *latents.shape[1:]),
                noise=validation_noise(i, (n, *latents.shape[1:])),
                timesteps=self.timesteps,
                mask=mask.expand(n, *mask.shape[1:]),
                valid=None,
                captions=[self.captions[i]] * n,
                prior_from=n,
                time_ids=time_ids.expand(n, 6),
            )
            losses.append(objective(unet, text, inputs, attention=False).item())
        return sum(losses) / len(losses)
