"""Write a Stable Diffusion pipeline (SD 1.x, SD 2.x or SDXL) as one original-layout (LDM)
checkpoint, the kind A1111 and ComfyUI load and diffusers' ``from_single_file`` reads back.

diffusers 0.42 converts LDM -> diffusers on load (``loaders/single_file_utils.py``) but ships
nothing for the other direction, so the renaming lives here. One ``.safetensors`` file holds

    model.diffusion_model.*   UNet  (input_blocks / middle_block / output_blocks; SDXL's
                                     size conditioning as label_emb.0.0 / label_emb.0.2)
    first_stage_model.*       VAE   (encoder.down / decoder.up, reversed order)

and the text encoder(s), by layout:

    "sd1"   cond_stage_model.transformer.text_model.*        CLIP (names as in transformers)
    "sd2"   cond_stage_model.model.*                          OpenCLIP (transformer.resblocks)
    "sdxl"  conditioner.embedders.0.transformer.text_model.*  CLIP      (text_encoder)
            conditioner.embedders.1.model.*                   OpenCLIP  (text_encoder_2)

OpenCLIP names: ``transformer.resblocks.{i}.attn.in_proj_weight/bias`` (q, k, v stacked),
``attn.out_proj``, ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final`` and, for an encoder with a projection, ``text_projection``
of shape (width, projection) used as ``x @ text_projection`` (the transpose of the Linear
weight). An SD 2.x file written here holds the diffusers text encoder as it is: 23 blocks and
no projection, where the original holds the unused 24th block and a projection; diffusers'
reader skips both anyway.

``checkpoint_layout(pipe)`` picks the layout: "sdxl" when the pipeline has a
``text_encoder_2``, "sd2" when its text encoder uses OpenCLIP's exact GELU (OpenAI's CLIP of
SD 1.x uses quick GELU), else "sd1". ``save_single_file(..., layout=...)`` overrides it.
``layout_of_keys(keys)`` reads the layout back from a file's names. The UNet layout follows
the UNet's config (levels, ``layers_per_block``, where attention is), so tiny test models and
full-size models go through the same code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fsutil import atomic_write_with

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x CLIP
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x OpenCLIP ViT-H
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL CLIP ViT-L
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL OpenCLIP ViT-bigG

LAYOUTS = ("sd1", "sd2", "sdxl")
# The first text-encoder prefix that tells a file's layout, checked in this order.
_LAYOUT_MARKERS = (
    ("sdxl", "conditioner.embedders."),
    ("sd2", OPEN_CLIP_PREFIX),
    ("sd1", "cond_stage_model.transformer."),
)
# Where each layout keeps its text encoders, in the pipeline's order (text_encoder, _2).
TEXT_PREFIXES = {
    "sd1": (TEXT_PREFIX,),
    "sd2": (OPEN_CLIP_PREFIX,),
    "sdxl": (SDXL_TEXT_PREFIX, SDXL_OPEN_CLIP_PREFIX),
}

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
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size embeddings
    "add_embedding.linear_2": "label_emb.0.2",
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
# A CLIP encoder layer: transformers -> OpenCLIP residual block (q/k/v are handled apart).
_OPEN_CLIP_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",  # a bare parameter
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
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

    raise ValueError(f"UNet weight {key!r} has no place in the LDM checkpoint layout")


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

    raise ValueError(f"VAE weight {key!r} has no place in the LDM checkpoint layout")


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


def text_encoder_to_ldm(
    text_encoder: torch.nn.Module, prefix: str = TEXT_PREFIX
) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under ``prefix`` (SD 1.x's ``cond_stage_model.transformer
    .text_model.`` by default, SDXL's first embedder with ``SDXL_TEXT_PREFIX``).

    transformers >= 5.6 dropped the ``text_model.`` level from CLIPTextModel's own names;
    older versions keep it. Both give the same checkpoint names.
    """
    return {
        prefix + key.removeprefix("text_model."): value
        for key, value in text_encoder.state_dict().items()
    }


def open_clip_to_ldm(
    text_encoder: torch.nn.Module, prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) under OpenCLIP's names below ``prefix`` (SD 2.x's
    ``cond_stage_model.model.`` by default, SDXL's second embedder with
    ``SDXL_OPEN_CLIP_PREFIX``): q, k and v stacked into one ``in_proj`` (3 * width, width),
    the projection (if any) as the (width, projection) ``text_projection`` matrix."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":  # Linear (proj, width) -> matrix (width, proj)
            out[prefix + "text_projection"] = value.T
        elif m := _OPEN_CLIP_QKV.fullmatch(key):
            if m[2] == "q":  # written once per layer and kind, from all three
                qkv = [state[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
                out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(qkv)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            mapped = _split(m[2], _OPEN_CLIP_BLOCK)
            if mapped is None:
                raise ValueError(f"text encoder weight {key!r} has no place in OpenCLIP's layout")
            out[f"{prefix}transformer.resblocks.{m[1]}.{''.join(mapped)}"] = value
        else:
            raise ValueError(f"text encoder weight {key!r} has no place in OpenCLIP's layout")
    return out


def checkpoint_layout(pipe) -> str:
    """The single-file layout ``pipe``'s components belong in: "sdxl", "sd2" or "sd1" (the
    rule is in the module docstring)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.text_encoder.config.hidden_act == "gelu":  # OpenCLIP; OpenAI CLIP is quick_gelu
        return "sd2"
    return "sd1"


def layout_of_keys(keys: Iterable[str]) -> str | None:
    """A checkpoint's layout read from its tensor names (its text encoders' prefixes): "sdxl",
    "sd2" or "sd1", None when no text encoder is there."""
    keys = list(keys)
    for layout, marker in _LAYOUT_MARKERS:
        if any(k.startswith(marker) for k in keys):
            return layout
    return None


def components_to_ldm(
    *, unet, vae, text_encoder, text_encoder_2=None, layout: str
) -> dict[str, torch.Tensor]:
    """The checkpoint names of the given components in ``layout`` ("sd1", "sd2", "sdxl"), with
    their tensors as they are (meta-device models give the names and shapes alone).

    Raises:
        ValueError: ``layout`` is unknown or does not fit the components given.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if (text_encoder_2 is not None) != (layout == "sdxl"):
        has = "with" if text_encoder_2 is not None else "without"
        raise ValueError(f"layout {layout!r} does not fit a pipeline {has} text_encoder_2")
    if layout == "sd1":
        text = text_encoder_to_ldm(text_encoder)
    elif layout == "sd2":
        text = open_clip_to_ldm(text_encoder)
    else:
        text = {
            **text_encoder_to_ldm(text_encoder, SDXL_TEXT_PREFIX),
            **open_clip_to_ldm(text_encoder_2, SDXL_OPEN_CLIP_PREFIX),
        }
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **text}


def pipeline_to_ldm(
    pipe, *, dtype: torch.dtype | None = None, layout: str | None = None
) -> dict[str, torch.Tensor]:
    """The whole checkpoint of ``pipe`` (UNet, VAE, text encoders) on the CPU; ``layout`` is
    "sd1", "sd2" or "sdxl", by default ``checkpoint_layout(pipe)``.

    Raises:
        ValueError: ``layout`` is unknown or does not fit the pipeline's components.
    """
    state = components_to_ldm(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        layout=checkpoint_layout(pipe) if layout is None else layout,
    )
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def save_single_file(
    pipe, path: str | Path, *, dtype: torch.dtype | None = None, layout: str | None = None
) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint and return its path.

    ``layout`` ("sd1", "sd2", "sdxl") defaults to ``checkpoint_layout(pipe)``. Load the file
    back with ``<pipeline class>.from_single_file(path, config=<a diffusers folder with the
    same component configs>, local_files_only=True)``, or ``models.base.load_base_model``. The
    file goes to a temporary name first, so a crash never leaves a half-written checkpoint.

    Raises:
        ValueError: ``path`` is not a .safetensors path, or ``layout`` does not fit ``pipe``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {path}")
    state = pipeline_to_ldm(pipe, dtype=dtype, layout=layout)
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return path
