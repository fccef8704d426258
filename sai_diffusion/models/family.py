"""What differs between Stable Diffusion families, behind one small interface.

    family = family_of(pipe)                         # read from the loaded model, never a flag
    context = family.encode(encoders, captions, device=...)   # what the UNet is conditioned on
    pred = family.predict(unet, noisy, timesteps, context, time_ids)
    family.latent_scale(vae), family.latent_shape(vae, (w, h)), family.prediction_type(scheduler)
    family.text_encoders(pipe)                       # (name, tokenizer, encoder) per encoder
    family.lora_targets, family.text_encoder_lora_targets, family.file_keys
    family.sampling_pipeline(pipe, scheduler=..., unet=...)

The recipe, sampling, the run loader, evaluation and the file writers ask the family instead of
assuming SD 1.5's layout. Two families:

- ``StableDiffusion``: SD 1.x and SD 2.x (its prediction type, epsilon or v, read from the
  scheduler config): one CLIP text encoder whose last hidden states condition the UNet.
- ``StableDiffusionXL``: SDXL and its finetunes (Pony, Illustrious, ...): two text encoders
  whose penultimate hidden states are concatenated (B, 77, 768 + 1280), the second's pooled and
  projected embedding passed as ``text_embeds``, and the micro-conditioning ``time_ids``
  (original size, crop top-left, target size; each (height, width) in pixels) per example.

``time_ids`` (B, 6) are computed for every example by the data path (``training.inputs``)
whatever the family; the SD family does not read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import DEFAULT_LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS
from ..errors import UserError
from ..files.lora_files import SD2_KEYS, SD_KEYS, SDXL_KEYS, FileKeys
from .tokens import tokenize


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a model: its name in the pipeline (and in LoRA files), its tokenizer
    and the module (possibly wrapped for training, e.g. by DDP)."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    module: nn.Module


class PooledContext(NamedTuple):
    """An SDXL-class conditioning: the hidden states the cross-attention reads and the pooled
    embedding the time embedding reads (either may be one row of a batch, without B)."""

    hidden: torch.Tensor  # (B, T, D1 + D2)
    pooled: torch.Tensor  # (B, P)


class StableDiffusion:
    """SD 1.x (and, through ``StableDiffusion2``, SD 2.x): one CLIP text encoder whose last
    hidden states (B, 77, D) condition the UNet's cross-attention; no other conditioning."""

    name = "sd1"
    label = "SD 1.x"
    lora_targets = DEFAULT_LORA_TARGETS
    text_encoder_lora_targets = TEXT_ENCODER_LORA_TARGETS
    file_keys: FileKeys = SD_KEYS
    layerwise_words = True  # Mix-of-Show's ED-LoRA is defined on this layout
    encoder_names: tuple[str, ...] = ("text_encoder",)

    def of(self, pipe: Any) -> StableDiffusion:
        """This family as ``pipe`` is: SD 2.x files say ``sd_v2`` in kohya's header."""
        return STABLE_DIFFUSION_2 if is_sd2(pipe) else self

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
        self,
        unet: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (noise or velocity) for ``noisy`` latents, in the UNet's dtype
        (``time_ids``: SDXL's size conditioning, not read by this family)."""
        dtype = next(unet.parameters()).dtype
        return unet(noisy.to(dtype), timesteps, context.to(dtype)).sample

    def native_resolution(self, pipe: Any) -> int:
        """The image side the model was trained at (512 for SD 1.5, 768 for SD 2.x-v, 1024 for
        SDXL): its UNet's sample size times the VAE's downsampling."""
        vae = pipe.vae
        return pipe.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    def refusals(self, cfg: Any) -> list[str]:
        """Settings that make no sense for this family, each as one line."""
        if cfg.lora.text_encoder_2:
            return ["lora.text_encoder_2 puts LoRA on an SDXL-class model's second text "
                    "encoder, and this model has one: leave it unset"]  # fmt: skip
        return []

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


class StableDiffusionXL(StableDiffusion):
    """SDXL-class models (module docstring): two text encoders, a pooled embedding and the
    size conditioning. Textual inversion and LoRA cover both encoders; Mix-of-Show's ED-LoRA
    (defined on SD 1.x's 16 cross-attention layers and one encoder) does not apply."""

    name = "sdxl"
    label = "SDXL-class"
    file_keys: FileKeys = SDXL_KEYS
    layerwise_words = False
    encoder_names = ("text_encoder", "text_encoder_2")

    def of(self, pipe: Any) -> StableDiffusionXL:
        return self

    def frozen_parts(self, pipe: Any) -> dict[str, nn.Module]:
        return {"denoiser": pipe.unet, "text": pipe.text_encoder, "text_2": pipe.text_encoder_2,
                "vae": pipe.vae}  # fmt: skip

    def text_encoders(self, pipe: Any, **modules: nn.Module) -> list[TextEncoder]:
        return [
            TextEncoder("text_encoder", pipe.tokenizer,
                        modules.get("text_encoder", pipe.text_encoder)),
            TextEncoder("text_encoder_2", pipe.tokenizer_2,
                        modules.get("text_encoder_2", pipe.text_encoder_2)),
        ]  # fmt: skip

    def encode(
        self, encoders: Sequence[TextEncoder], captions: Sequence[str], *, device
    ) -> PooledContext:
        """The penultimate hidden states of both encoders side by side, and the second one's
        projected pooled embedding: what ``StableDiffusionXLPipeline.encode_prompt`` gives
        (without clip skip)."""
        hidden, pooled = [], None
        for encoder in encoders:
            out = encoder.module(
                tokenize(encoder.tokenizer, captions).to(device), output_hidden_states=True
            )
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: its projected pooled embedding (B, P)
        return PooledContext(torch.cat(hidden, dim=-1), pooled)

    def predict(
        self,
        unet: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: PooledContext,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction with SDXL's added conditioning: the pooled text embedding and
        ``time_ids`` (B, 6) (original h, w; crop top, left; target h, w)."""
        if time_ids is None:
            raise ValueError("an SDXL-class UNet needs time_ids (original size, crop, target)")
        dtype = next(unet.parameters()).dtype
        added = {
            "text_embeds": context.pooled.to(dtype),
            "time_ids": time_ids.to(noisy.device, dtype),
        }
        return unet(noisy.to(dtype), timesteps, context.hidden.to(dtype),
                    added_cond_kwargs=added).sample  # fmt: skip

    def refusals(self, cfg: Any) -> list[str]:
        """ED-LoRA, Mix-of-Show's attention regularisation and its resize-crop-pad are defined
        on SD 1.x; SDXL's size conditioning describes a crop, not a paste on black."""
        out = []
        if cfg.embeddings.edlora:
            out.append("embeddings.edlora (Mix-of-Show's ED-LoRA) is defined on SD 1.x models; "
                       "an SDXL-class model trains plain concept words: set embeddings.edlora=false")  # fmt: skip
        if cfg.loss.attn_reg_weight > 0:
            out.append("loss.attn_reg_weight (Mix-of-Show's attention regularisation) is not "
                       "available on SDXL-class models: set loss.attn_reg_weight=0")  # fmt: skip
        if cfg.data.augmentation != "crop":
            out.append(f"data.augmentation={cfg.data.augmentation} pastes the image on black, "
                       "which SDXL's size conditioning cannot describe: set data.augmentation=crop")  # fmt: skip
        return out

    def sampling_pipeline(
        self, pipe: Any, *, scheduler: str = "dpm-solver", **modules: nn.Module
    ) -> StableDiffusionXLPipeline:
        parts = {"vae": pipe.vae, "text_encoder": pipe.text_encoder,
                 "text_encoder_2": pipe.text_encoder_2, "tokenizer": pipe.tokenizer,
                 "tokenizer_2": pipe.tokenizer_2, "unet": pipe.unet, **modules}  # fmt: skip
        own = pipe.scheduler
        sampler = StableDiffusionXLPipeline(
            **parts,
            scheduler=own
            if scheduler == "native"
            else DPMSolverMultistepScheduler.from_config(own.config),
            force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True),
        )
        sampler.set_progress_bar_config(disable=True)
        return sampler


class StableDiffusion2(StableDiffusion):
    """SD 2.x: SD 1.x's layout with an OpenCLIP text encoder (width 1024), often v-prediction;
    only its kohya header differs (``sd_v2``, ``ss_v2``)."""

    name = "sd2"
    label = "SD 2.x"
    file_keys: FileKeys = SD2_KEYS

    def of(self, pipe: Any) -> StableDiffusion2:
        return self


STABLE_DIFFUSION = StableDiffusion()
STABLE_DIFFUSION_2 = StableDiffusion2()
STABLE_DIFFUSION_XL = StableDiffusionXL()


# by the names ``models.base.describe_base`` reads from a checkpoint before it loads
FAMILIES: dict[str, StableDiffusion] = {
    "sd1": STABLE_DIFFUSION, "sd2": STABLE_DIFFUSION_2, "sdxl": STABLE_DIFFUSION_XL,
}  # fmt: skip


def is_sdxl(pipe: Any) -> bool:
    """Two text encoders, or a UNet conditioned on more than text (SDXL's ``text_time``)."""
    return getattr(pipe, "text_encoder_2", None) is not None or bool(
        pipe.unet.config.get("addition_embed_type")
    )


def is_sd2(pipe: Any) -> bool:
    """SD 2.x: an SD 1.x layout whose text encoder is OpenCLIP's (GELU; SD 1.x's CLIP ViT-L
    uses quick-GELU)."""
    return not is_sdxl(pipe) and pipe.text_encoder.config.hidden_act == "gelu"


def family_of(pipe: Any) -> StableDiffusion:
    """The family of a loaded pipeline, read from its modules.

    Raises:
        UserError: an SDXL-class UNet without the second text encoder (a refiner, or a
            pipeline of another kind).
    """
    if is_sdxl(pipe):
        if (
            getattr(pipe, "text_encoder", None) is None
            or getattr(pipe, "text_encoder_2", None) is None
        ):
            raise UserError(
                "this base model conditions its UNet like SDXL but lacks one of SDXL's two text "
                "encoders (an SDXL refiner?); sai-diffusion trains SD 1.x, SD 2.x and SDXL "
                "base-class checkpoints"
            )
        return STABLE_DIFFUSION_XL
    return STABLE_DIFFUSION.of(pipe)
