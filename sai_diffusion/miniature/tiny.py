"""Tiny Stable Diffusion pipelines with random weights, for tests and as the starting point of
the miniature world: SD 1.5 (``build_tiny_pipeline``), SD 2.x (``build_tiny_sd2_pipeline``)
and SDXL (``build_tiny_sdxl_pipeline``).

Each has the component classes, block types and checkpoint layout of its family's shipped
config folder (configs/sd15, configs/sd2, configs/sdxl), only narrower and shallower: UNets of
~1 M parameters, a two-level AutoencoderKL (latents are half the image side, 4 channels),
CLIP text encoders of width 32-48 and a CLIP BPE tokenizer cut to the first ``num_merges``
merges (ids shared with the full vocabulary below 512 + N). Everything LoRA training touches
(attention projections, the text encoders, token embeddings, the single-file layout) is where
it is in the full model.

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
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .._resources import sd2_config_dir, sd15_config_dir, sdxl_config_dir
from . import clip_vocab

__all__ = [
    "DEFAULT_NUM_MERGES",
    "build_tiny_pipeline",
    "build_tiny_sd2_pipeline",
    "build_tiny_sdxl_pipeline",
]

# 8,000 merges: everyday English words ("photo", "sketch", "holding") are single tokens,
# and the embedding table stays small (8,514 x 32).
DEFAULT_NUM_MERGES = 8000
_SCHEDULERS = {"pndm": PNDMScheduler, "ddpm": DDPMScheduler}
OPEN_CLIP_PAD = "!"  # SD 2.x's tokenizer and SDXL's second one pad with "!" (id 0)


def _shipped_config(folder: Path, component: str, filename: str = "config.json") -> dict:
    """A component config of a shipped folder, without diffusers' bookkeeping keys."""
    data = json.loads((folder / component / filename).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _sd15_config(component: str, filename: str = "config.json") -> dict:
    return _shipped_config(sd15_config_dir(), component, filename)


def _sd15_pattern(cross_attention: str, plain: str, levels: int) -> list[str]:
    """SD 1.x and 2.x put cross-attention on every level but the deepest one."""
    return [cross_attention] * (levels - 1) + [plain]


def _check_widths(widths: Sequence[int], norm_num_groups: int) -> None:
    for width in widths:
        if width % norm_num_groups:
            raise ValueError(
                f"channel width {width} is not divisible by norm_num_groups={norm_num_groups}"
            )


def _tiny_tokenizer(num_merges: int, *, pad_token: str | None = None) -> CLIPTokenizer:
    """CLIP's BPE cut to ``num_merges`` merges; ``pad_token`` replaces <|endoftext|> padding."""
    with tempfile.TemporaryDirectory() as tmp:
        clip_vocab.write_tokenizer_files(tmp, num_merges=num_merges)
        if pad_token is None:
            return CLIPTokenizer.from_pretrained(tmp)
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token)


def _tiny_vae_config(
    full: dict, channels: Sequence[int], norm_num_groups: int, image_size: int
) -> dict:
    """``full`` (a shipped VAE config, scaling factor included) at tiny widths."""
    return {
        **full,
        "block_out_channels": list(channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": 1,
        "norm_num_groups": norm_num_groups,
        "sample_size": image_size,
    }


def _tiny_text_config(
    full: dict,
    tokenizer: CLIPTokenizer,
    *,
    hidden_size: int,
    layers: int,
    heads: int,
    projection_dim: int,
) -> CLIPTextConfig:
    """``full`` (a shipped text encoder config: activation, positions) at tiny sizes."""
    return CLIPTextConfig(
        **{
            **full,
            "hidden_size": hidden_size,
            "intermediate_size": 4 * hidden_size,  # CLIP's MLP ratio
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "projection_dim": projection_dim,
            "vocab_size": len(tokenizer),
            # The small vocabulary's own ids (the published legacy 0/1/2 would still pool
            # correctly, but these are the true ones).
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )


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
    _check_widths((*unet_channels, *vae_channels), norm_num_groups)

    tokenizer = _tiny_tokenizer(num_merges)
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
    vae_config = _tiny_vae_config(
        _sd15_config("vae"), vae_channels, norm_num_groups, sample_size * vae_scale
    )
    text_config = _tiny_text_config(
        _sd15_config("text_encoder"),
        tokenizer,
        hidden_size=text_hidden_size,
        layers=text_layers,
        heads=text_heads,
        projection_dim=text_hidden_size,
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


def build_tiny_sd2_pipeline(
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
    text_projection_dim: int = 16,
    num_merges: int = DEFAULT_NUM_MERGES,
    vae_channels: Sequence[int] = (32, 64),
) -> StableDiffusionPipeline:
    """Build a tiny SD-2.x-architecture (768-v) pipeline with random weights fixed by ``seed``.

    What sets it apart from ``build_tiny_pipeline``, as in configs/sd2: Linear ``proj_in`` /
    ``proj_out`` in the transformer blocks, upcast attention, per-level head counts, an
    OpenCLIP-style text encoder (exact GELU) whose tokenizer pads with "!", and configs/sd2's
    DDIM scheduler predicting v. Sizes, seeds, ``out_dir`` and the caller's RNG behave as in
    ``build_tiny_pipeline`` (64 px images by default).

    Raises:
        ValueError: a width is not divisible as the blocks need.
    """
    _check_widths((*unet_channels, *vae_channels), norm_num_groups)
    folder = sd2_config_dir()
    tokenizer = _tiny_tokenizer(num_merges, pad_token=OPEN_CLIP_PAD)
    levels = len(unet_channels)
    unet_config = {
        **_shipped_config(folder, "unet"),
        "block_out_channels": list(unet_channels),
        "down_block_types": _sd15_pattern("CrossAttnDownBlock2D", "DownBlock2D", levels),
        "up_block_types": _sd15_pattern("CrossAttnUpBlock2D", "UpBlock2D", levels)[::-1],
        "layers_per_block": layers_per_block,
        "attention_head_dim": [attention_heads] * levels,  # heads per level, as SD 2's list
        "cross_attention_dim": text_hidden_size,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
    }
    vae_config = _tiny_vae_config(
        _shipped_config(folder, "vae"),
        vae_channels,
        norm_num_groups,
        sample_size * 2 ** (len(vae_channels) - 1),
    )
    text_config = _tiny_text_config(
        _shipped_config(folder, "text_encoder"),
        tokenizer,
        hidden_size=text_hidden_size,
        layers=text_layers,
        heads=text_heads,
        projection_dim=text_projection_dim,
    )
    scheduler_config = _shipped_config(folder, "scheduler", "scheduler_config.json")

    with torch.random.fork_rng(devices=[]):  # one seed per component, as build_tiny_pipeline
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
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out_dir is not None:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_sdxl_pipeline(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    sample_size: int = 32,
    unet_channels: Sequence[int] = (32, 64),
    transformer_layers_per_block: Sequence[int] = (1, 2),
    layers_per_block: int = 1,
    attention_heads: Sequence[int] = (2, 4),
    addition_time_embed_dim: int = 8,
    norm_num_groups: int = 8,
    text_hidden_size: int = 32,
    text_hidden_size_2: int = 48,
    text_layers: int = 3,
    text_heads: int = 4,
    text_projection_dim_2: int = 24,
    num_merges: int = DEFAULT_NUM_MERGES,
    vae_channels: Sequence[int] = (32, 64),
) -> StableDiffusionXLPipeline:
    """Build a tiny SDXL-architecture pipeline with random weights fixed by ``seed``.

    As configs/sdxl: no attention on the first UNet level, ``transformer_layers_per_block``
    transformer blocks per level (the mid block takes the last count), text-and-size
    micro-conditioning (``addition_embed_type="text_time"``, input width
    ``text_projection_dim_2 + 6 * addition_time_embed_dim``), cross-attention over both text
    encoders' hidden states side by side (``text_hidden_size + text_hidden_size_2``), a CLIP
    (quick GELU) ``text_encoder``, an OpenCLIP-style ``text_encoder_2`` with a projection
    (exact GELU, ``tokenizer_2`` pads with "!"), a VAE with SDXL's scaling factor 0.13025 and
    the Euler scheduler. The default widths differ on purpose (32 vs 48, projection 24): a
    mixed-up encoder or an untransposed projection shows as a shape error, and diffusers'
    single-file reader tells the two embedders apart by width, so keep ``text_hidden_size !=
    text_hidden_size_2`` for files written with ``files.ldm.save_single_file``. Sizes, seeds,
    ``out_dir`` and the caller's RNG behave as in ``build_tiny_pipeline``.

    Raises:
        ValueError: a width is not divisible as the blocks need, or the per-level lists do not
            match ``unet_channels``.
    """
    _check_widths((*unet_channels, *vae_channels), norm_num_groups)
    levels = len(unet_channels)
    if not len(transformer_layers_per_block) == len(attention_heads) == levels:
        raise ValueError(
            f"transformer_layers_per_block {list(transformer_layers_per_block)} and "
            f"attention_heads {list(attention_heads)} need one entry per level ({levels})"
        )
    folder = sdxl_config_dir()
    tokenizer = _tiny_tokenizer(num_merges)
    tokenizer_2 = _tiny_tokenizer(num_merges, pad_token=OPEN_CLIP_PAD)
    unet_config = {
        **_shipped_config(folder, "unet"),
        "block_out_channels": list(unet_channels),
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
        "transformer_layers_per_block": list(transformer_layers_per_block),
        "layers_per_block": layers_per_block,
        "attention_head_dim": list(attention_heads),
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": text_projection_dim_2
        + 6 * addition_time_embed_dim,  # pooled text + (original, crop, target) sizes
        "cross_attention_dim": text_hidden_size + text_hidden_size_2,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
    }
    vae_config = _tiny_vae_config(
        _shipped_config(folder, "vae"),
        vae_channels,
        norm_num_groups,
        sample_size * 2 ** (len(vae_channels) - 1),
    )
    text_config = _tiny_text_config(
        _shipped_config(folder, "text_encoder"),
        tokenizer,
        hidden_size=text_hidden_size,
        layers=text_layers,
        heads=text_heads,
        projection_dim=text_hidden_size,
    )
    text_config_2 = _tiny_text_config(
        _shipped_config(folder, "text_encoder_2"),
        tokenizer_2,
        hidden_size=text_hidden_size_2,
        layers=text_layers,
        heads=text_heads,
        projection_dim=text_projection_dim_2,
    )
    scheduler_config = _shipped_config(folder, "scheduler", "scheduler_config.json")

    with torch.random.fork_rng(devices=[]):  # one seed per component, as build_tiny_pipeline
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(vae_config)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)

    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if out_dir is not None:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
