"""What differs between Stable Diffusion families, behind one small interface.

    family = family_of(pipe)                         # read from the loaded model, never a flag
    context = family.encode(encoders, captions, device=...)   # what the UNet is conditioned on
    pred = family.predict(unet, noisy, timesteps, context)
    family.latent_scale(vae), family.latent_shape(vae, (w, h)), family.prediction_type(scheduler)
    family.text_encoders(pipe)                       # (name, tokenizer, encoder) per encoder
    family.lora_targets, family.text_encoder_lora_targets, family.file_keys
    family.sampling_pipeline(pipe, scheduler=..., unet=...)

The recipe, sampling, the run loader, evaluation and the file writers ask the family instead of
assuming SD 1.5's layout. ``StableDiffusion`` (SD 1.x, and the SD 2.x layout with its prediction
type read from the scheduler) is the one family today; an SDXL-class family (two text encoders,
a pooled embedding and size conditioning) adds its own class here without touching the
training loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import DEFAULT_LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS
from ..errors import UserError
from ..files.lora_files import SD_KEYS, FileKeys
from .tokens import tokenize


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a model: its name in the pipeline (and in LoRA files), its tokenizer
    and the module (possibly wrapped for training, e.g. by DDP)."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    module: nn.Module


class StableDiffusion:
    """SD 1.x and the SD 2.x layout: one CLIP text encoder whose last hidden states (B, 77, D)
    condition the UNet's cross-attention; no other conditioning."""

    name = "sd"
    label = "SD 1.x / 2.x"
    lora_targets = DEFAULT_LORA_TARGETS
    text_encoder_lora_targets = TEXT_ENCODER_LORA_TARGETS
    file_keys: FileKeys = SD_KEYS
    layerwise_words = True  # Mix-of-Show's ED-LoRA is defined on this layout

    def frozen_parts(self, pipe: Any) -> dict[str, nn.Module]:
        """The model's networks by role: ``denoiser``, ``text`` (every text encoder), ``vae``."""
        return {"denoiser": pipe.unet, "text": pipe.text_encoder, "vae": pipe.vae}

    def text_encoders(self, pipe: Any, **modules: nn.Module) -> list[TextEncoder]:
        """The model's text encoders; ``modules`` replace some (``text_encoder=wrapped``)."""
        return [TextEncoder("text_encoder", pipe.tokenizer,
                            modules.get("text_encoder", pipe.text_encoder))]  # fmt: skip

    def encode(
        self, encoders: Sequence[TextEncoder], captions: Sequence[str], *, device
    ) -> torch.Tensor:
        """(B, T, D): the context of ``captions``, as diffusers' pipelines compute it."""
        (encoder,) = encoders
        return encoder.module(tokenize(encoder.tokenizer, captions).to(device))[0]

    def predict(
        self, unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's prediction (noise or velocity) for ``noisy`` latents, in the UNet's dtype."""
        dtype = next(unet.parameters()).dtype
        return unet(noisy.to(dtype), timesteps, context.to(dtype)).sample

    def latent_scale(self, vae: nn.Module) -> float:
        """What the VAE's latents are multiplied by for the UNet (its config says)."""
        return vae.config.scaling_factor

    def latent_shape(self, vae: nn.Module, size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a (width, height) image."""
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        width, height = size
        return vae.config.latent_channels, height // factor, width // factor

    def prediction_type(self, scheduler: Any) -> str:
        """``epsilon`` or ``v_prediction``, as the model's scheduler config says."""
        return scheduler.config.prediction_type

    def sampling_pipeline(
        self, pipe: Any, *, scheduler: str = "dpm-solver", **modules: nn.Module
    ) -> StableDiffusionPipeline:
        """``pipe``'s modules (``modules`` replace some: training samples its live ones) as a
        pipeline without safety checker or progress bar, under DPM-Solver++ (from ``pipe``'s
        noise schedule) or, with ``scheduler="native"``, the model's own scheduler."""
        parts = {"vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                 "unet": pipe.unet, **modules}  # fmt: skip
        own = pipe.scheduler
        sampler = StableDiffusionPipeline(
            **parts,
            scheduler=own
            if scheduler == "native"
            else DPMSolverMultistepScheduler.from_config(own.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        sampler.set_progress_bar_config(disable=True)
        return sampler


STABLE_DIFFUSION = StableDiffusion()


def family_of(pipe: Any) -> StableDiffusion:
    """The family of a loaded pipeline, read from its modules.

    Raises:
        UserError: a model of a family this version does not train (SDXL-class: a second text
            encoder, or a UNet conditioned on more than text).
    """
    unet_config = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None or unet_config.get("addition_embed_type"):
        raise UserError(
            "this base model is SDXL-class (two text encoders, size conditioning); this version "
            "of sai-diffusion trains SD 1.x / 2.x checkpoints (SD 1.5, ChilloutMix, ...)"
        )
    return STABLE_DIFFUSION
