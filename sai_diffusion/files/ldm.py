"""Write an SD-1.x pipeline as one original-layout (LDM) checkpoint, the kind A1111 and
ComfyUI load and ``StableDiffusionPipeline.from_single_file`` reads back.

diffusers 0.42 converts LDM -> diffusers on load (``loaders/single_file_utils.py``) but ships
nothing for the other direction, so the renaming lives here. One ``.safetensors`` file holds

    model.diffusion_model.*                    UNet   (input_blocks / middle_block / output_blocks)
    first_stage_model.*                        VAE    (encoder.down / decoder.up, reversed order)
    cond_stage_model.transformer.text_model.*  CLIP text encoder (names as in transformers)

The layout follows the UNet's config (levels, ``layers_per_block``, where attention is), so
tiny test models and full-size SD 1.5 go through the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fsutil import atomic_write_with

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# ResnetBlock2D sub-module names: diffusers -> LDM ResBlock.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}
# The VAE's mid-block attention: diffusers uses Linear layers, LDM used 1x1 convolutions.
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _split(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    """(mapped module, ".weight"-style remainder) if ``key`` starts with one of ``prefixes``."""
    for diffusers_name, ldm_name in prefixes.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name, key[len(diffusers_name) :]
    return None


def _unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    per_level = layers_per_block + 1  # LDM numbers a level's resnets and its resampler together
    if (top := _split(key, _UNET_TOP)) is not None:
        return "".join(top)

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + level * per_level + j
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet_rest(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"

    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"

    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = level * per_level + j
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet_rest(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if up_has_attention[level] else 1  # the upsampler follows the attention, if any
        return f"output_blocks.{level * per_level + layers_per_block}.{slot}.conv.{m[2]}"

    raise ValueError(f"UNet weight {key!r} has no place in the SD 1.x checkpoint layout")


def _resnet_rest(rest: str) -> str:
    mapped = _split(rest, _UNET_RESNET)
    if mapped is None:
        raise ValueError(f"unexpected resnet weight {rest!r}")
    return "".join(mapped)


def _vae_key(key: str, num_levels: int) -> str:
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):  # quant_conv, post_quant_conv keep their names
        return key
    if (top := _split(rest, _VAE_TOP)) is not None:
        return f"{coder}.{''.join(top)}"

    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        side, level, j, tail = m[1], int(m[2]), int(m[3]), m[4]
        tail = tail.replace("conv_shortcut", "nin_shortcut")
        if side == "up":
            level = num_levels - 1 - level  # LDM numbers decoder levels from the latent side up
        return f"{coder}.{side}.{level}.block.{j}.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{coder}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{coder}.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"

    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{coder}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        mapped = _split(m[1], _VAE_ATTN)
        if mapped is not None:
            return f"{coder}.mid.attn_1.{''.join(mapped)}"

    raise ValueError(f"VAE weight {key!r} has no place in the SD 1.x checkpoint layout")


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights under their ``model.diffusion_model.*`` names."""
    config = unet.config
    up_has_attention = ["CrossAttn" in name for name in config.up_block_types]
    return {
        UNET_PREFIX + _unet_key(key, config.layers_per_block, up_has_attention): value
        for key, value in unet.state_dict().items()
    }


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights under their ``first_stage_model.*`` names."""
    num_levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        ldm_key = VAE_PREFIX + _vae_key(key, num_levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        out[ldm_key] = value
    return out


def text_encoder_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under ``cond_stage_model.transformer.text_model.*``.

    transformers >= 5.6 dropped the ``text_model.`` level from CLIPTextModel's own names;
    older versions keep it. Both give the same checkpoint names.
    """
    return {
        TEXT_PREFIX + key.removeprefix("text_model."): value
        for key, value in text_encoder.state_dict().items()
    }


def pipeline_to_ldm(pipe, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole checkpoint: UNet, VAE and text encoder of an SD-1.x pipeline, on the CPU."""
    state = {
        **unet_to_ldm(pipe.unet),
        **vae_to_ldm(pipe.vae),
        **text_encoder_to_ldm(pipe.text_encoder),
    }
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def save_single_file(pipe, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint and return its path.

    Load it back with ``StableDiffusionPipeline.from_single_file(path, config=<a diffusers
    folder with the same component configs>, local_files_only=True)``. The file goes to a
    temporary name first, so a crash never leaves a half-written checkpoint.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {path}")
    state = pipeline_to_ldm(pipe, dtype=dtype)
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return path
