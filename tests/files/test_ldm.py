"""files.ldm: a pipeline written as one original-layout (LDM) checkpoint, read back by diffusers'
own single-file loader exactly."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open

from sai_diffusion._resources import sd15_config_dir
from sai_diffusion.files.ldm import save_single_file, unet_to_ldm, vae_to_ldm
from tests.helpers import assert_same_weights


def test_single_file_round_trip_is_exact(tiny_pipeline_dir, tiny_single_file):
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(
        str(tiny_single_file), config=str(tiny_pipeline_dir), local_files_only=True
    )
    assert_same_weights(original, loaded)


def test_single_file_uses_the_original_sd_layout(tiny_single_file):
    with safe_open(str(tiny_single_file), framework="pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    prefixes = (
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.transformer.text_model.",
    )
    assert all(k.startswith(prefixes) for k in keys)
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after a plain level
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in keys, key
    assert len(q_shape) == 4  # LDM's VAE attention is a 1x1 convolution


def test_save_single_file_fp16_and_atomic(tmp_path, tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(pipe, tmp_path / "x.ckpt")


def test_ldm_names_of_full_size_sd15_invert_diffusers_own_conversion():
    """Full-size SD 1.5 UNet and VAE on the meta device (no memory): our names fed to
    diffusers' LDM->diffusers converters give back exactly the model's own names and shapes,
    and diffusers recognises the layout as SD v1."""
    config_dir = sd15_config_dir()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_dir / "unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    ldm_unet, ldm_vae = unet_to_ldm(unet), vae_to_ldm(vae)
    assert len(ldm_unet) == 686 and len(ldm_vae) == 248  # key counts of the SD 1.5 checkpoint
    assert infer_diffusers_model_type({**ldm_unet, **ldm_vae}) == "v1"
    for model, ldm, convert in [
        (unet, ldm_unet, convert_ldm_unet_checkpoint),
        (vae, ldm_vae, convert_ldm_vae_checkpoint),
    ]:
        back = convert(ldm, dict(model.config))
        own = model.state_dict()
        assert back.keys() == own.keys()
        assert all(back[k].shape == own[k].shape for k in own)
