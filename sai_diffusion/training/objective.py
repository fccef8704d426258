"""The training objective of one micro-batch.

    loss = loss_scale * (mean over concept examples of the masked, min-SNR-weighted MSE
                         + prior_loss_weight * the same mean over class examples)
           + attn_reg_weight * the concept words' attention outside the subject masks

The UNet predicts the noise or the velocity, as the model's scheduler says
(``loss.prediction_target``); the family (``models.family``) runs it with its conditioning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..models.edlora import LayerwiseAttnProcessor
from ..models.family import StableDiffusion
from .attention import attention_penalty
from .inputs import Inputs
from .loss import min_snr_weight, per_sample_mse, prediction_target
from .text import CaptionEncoder


class Objective:
    """``objective(unet, text, inputs)`` -> the scalar loss (module docstring).

    ``use_masks``: weight the MSE by the subject masks (else by the pasted area of
    resize-crop-pad, when ``inputs.valid`` holds it). ``attention``: the cross-attention
    processors that record the maps the penalty reads (empty without attn_reg_weight);
    ``words``: the concept words they look for.
    """

    def __init__(
        self,
        family: StableDiffusion,
        scheduler,
        *,
        device,
        use_masks: bool = True,
        min_snr_gamma: float = 0.0,
        prior_loss_weight: float = 1.0,
        loss_scale: float = 1.0,
        attn_reg_weight: float = 0.0,
        attention: Sequence[LayerwiseAttnProcessor] = (),
        words: Sequence[str] = (),
    ) -> None:
        self.family, self.scheduler, self.device = family, scheduler, device
        self.use_masks, self.min_snr_gamma = use_masks, min_snr_gamma
        self.prior_loss_weight, self.loss_scale = prior_loss_weight, loss_scale
        self.attn_reg_weight = attn_reg_weight
        self.attention, self.words = list(attention), list(words)

    def __call__(
        self, unet: nn.Module, text: CaptionEncoder, inputs: Inputs, *, attention: bool = True
    ) -> torch.Tensor:
        """The loss; with ``attention`` False, without the attention penalty (validation)."""
        device, sched = self.device, self.scheduler
        latents, noise = inputs.latents.to(device), inputs.noise.to(device)
        timesteps = inputs.timesteps.to(device)
        noisy = sched.add_noise(latents, noise, timesteps)
        context = text(inputs.captions)
        with self._recording(attention) as records:
            pred = self.family.predict(unet, noisy, timesteps, context, inputs.time_ids)
        target = prediction_target(sched, latents, noise, timesteps)
        mask = inputs.mask if self.use_masks else inputs.valid
        per_sample = per_sample_mse(pred, target, None if mask is None else mask.to(device))
        if self.min_snr_gamma > 0:
            per_sample = per_sample * min_snr_weight(sched, timesteps, self.min_snr_gamma)
        n = inputs.prior_from  # the class examples follow the concept's
        loss = per_sample[:n].mean()
        if n < len(per_sample):
            loss = loss + self.prior_loss_weight * per_sample[n:].mean()
        loss = loss * self.loss_scale
        if records:  # class captions hold no concept word: only the concept's rows count
            positions = text.word_positions(inputs.captions, self.words)
            penalty = attention_penalty(records, positions, inputs.mask.to(device),
                                        tuple(latents.shape[-2:]))  # fmt: skip
            loss = loss + self.attn_reg_weight * penalty
        return loss

    @contextlib.contextmanager
    def _recording(self, enabled: bool):
        """The cross-attention probabilities of one UNet call, when the penalty is on."""
        if self.attn_reg_weight <= 0 or not enabled or not self.attention:
            yield []
            return
        records: list = []
        for p in self.attention:
            p.record = records
        try:
            yield records
        finally:
            for p in self.attention:
                p.record = None
