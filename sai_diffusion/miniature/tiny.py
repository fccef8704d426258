"""Tiny Stable-Diffusion-1.5-architecture pipelines with random weights, for tests and as the
starting point of the miniature world.

Same component classes, block types and checkpoint layout as SD 1.5 (configs/sd15), only
narrower and shallower: a UNet of ~0.8 M parameters, a two-level AutoencoderKL (latents are
half the image side, 4 channels), a 5-layer CLIP text encoder of width 32 and a CLIP BPE
tokenizer cut to the first ``num_merges`` merges (ids shared with SD 1.5 below 512 + N).
Everything LoRA training touches (attention projections, the text encoder, token embeddings,
the single-file layout) is where it is in the full model.

    pipe = build_tiny_pipeline("out/tiny")           # also saved as a diffusers folder
    files.ldm.save_single_file(pipe, "out/tiny.safetensors")  # and as one LDM checkpoint
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .._resources import sd15_config_dir
from . import clip_vocab

__all__ = ["DEFAULT_NUM_MERGES", "build_tiny_pipeline"]

# 8,000 merges: everyday English words ("photo", "sketch", "holding") are single tokens,
# and the embedding table stays small (8,514 x 32).
DEFAULT_NUM_MERGES = 8000
_SCHEDULERS = {"pndm": PNDMScheduler, "ddpm": DDPMScheduler}


def _sd15_config(component: str, filename: str = "config.json") -> dict:
    """A component config of the shipped SD 1.5 folder, without diffusers' bookkeeping keys."""
    data = json.loads((sd15_config_dir() / component / filename).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _sd15_pattern(cross_attention: str, plain: str, levels: int) -> list[str]:
    """SD 1.5 puts cross-attention on every level but the deepest one."""
    return [cross_attention] * (levels - 1) + [plain]


def build_tiny_pipeline(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    sample_size: int = 32,
    unet_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention_heads: int = 2,
    norm_num_groups: int = 8,
    text_hidden_size: int = 32,
    text_layers: int = 5,
    text_heads: int = 4,
    num_merges: int = DEFAULT_NUM_MERGES,
    vae_channels: Sequence[int] = (32, 64),
    scheduler: str = "pndm",
) -> StableDiffusionPipeline:
    """Build a tiny SD-1.5-architecture pipeline with random weights fixed by ``seed``.

    ``sample_size`` is the UNet's latent side; images are ``sample_size * 2 ** (len(vae_channels)
    - 1)`` pixels (64 by default). ``unet_channels`` sets the number of UNet levels: attention
    on all but the deepest, as in SD 1.5. ``scheduler`` is ``"pndm"`` (SD 1.5's) or ``"ddpm"``,
    both with SD 1.5's noise schedule. When ``out_dir`` is given the pipeline is also saved
    there as a diffusers folder (safetensors), ready for ``load_base_model`` and for
    ``from_single_file(..., config=out_dir)``. The caller's global RNG state is left untouched.

    Raises:
        ValueError: ``scheduler`` is unknown or a width is not divisible as the blocks need.
    """
    if scheduler not in _SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(_SCHEDULERS)}, got {scheduler!r}")
    for width in (*unet_channels, *vae_channels):
        if width % norm_num_groups:
            raise ValueError(
                f"channel width {width} is not divisible by norm_num_groups={norm_num_groups}"
            )

    with tempfile.TemporaryDirectory() as tmp:
        clip_vocab.write_tokenizer_files(tmp, num_merges=num_merges)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)

    vae_scale = 2 ** (len(vae_channels) - 1)
    levels = len(unet_channels)
    unet_config = {
        **_sd15_config("unet"),
        "block_out_channels": list(unet_channels),
        "down_block_types": _sd15_pattern("CrossAttnDownBlock2D", "DownBlock2D", levels),
        "up_block_types": _sd15_pattern("CrossAttnUpBlock2D", "UpBlock2D", levels)[::-1],
        "layers_per_block": layers_per_block,
        "attention_head_dim": attention_heads,  # the number of heads, in diffusers' SD 1.x naming
        "cross_attention_dim": text_hidden_size,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
    }
    vae_config = {
        **_sd15_config("vae"),
        "block_out_channels": list(vae_channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(vae_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(vae_channels),
        "layers_per_block": 1,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size * vae_scale,
    }
    text_config = CLIPTextConfig(
        **{
            **_sd15_config("text_encoder"),
            "hidden_size": text_hidden_size,
            "intermediate_size": 4 * text_hidden_size,  # CLIP's MLP ratio
            "num_attention_heads": text_heads,
            "num_hidden_layers": text_layers,
            "projection_dim": text_hidden_size,
            "vocab_size": len(tokenizer),
            # The small vocabulary's own ids (SD 1.5's legacy 0/1/2 would still pool correctly,
            # but these are the true ones).
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    scheduler_config = _sd15_config("scheduler", "scheduler_config.json")

    # One seed per component, so changing one component's size leaves the others' weights alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(vae_config)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_SCHEDULERS[scheduler].from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out_dir is not None:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
