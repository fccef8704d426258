"""files.ldm: a pipeline (SD 1.x, SD 2.x, SDXL) written as one original-layout (LDM) checkpoint,
read back by diffusers' own single-file loader exactly."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sai_diffusion._resources import sd2_config_dir, sd15_config_dir, sdxl_config_dir
from sai_diffusion.files.ldm import (
    checkpoint_layout,
    layout_of_keys,
    open_clip_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
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


# ------------------------------------------------------------------------------ SD 2.x, SDXL
@pytest.fixture(scope="module")
def sd2_file(tiny_sd2_dir, tmp_path_factory):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, local_files_only=True)
    return save_single_file(pipe, tmp_path_factory.mktemp("sd2-file") / "sd2.safetensors")


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_dir, tmp_path_factory):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    return save_single_file(pipe, tmp_path_factory.mktemp("sdxl-file") / "sdxl.safetensors")


def _header(path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118


def _assert_same_components(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is None:
            assert getattr(b, name, None) is None, name
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_sd2_file_has_the_open_clip_layout(sd2_file, tiny_sd2_dir):
    """SD 2.x: the text encoder as OpenCLIP under cond_stage_model.model., q/k/v stacked."""
    shapes = _header(sd2_file)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")
    assert all(k.startswith(prefixes) for k in shapes)
    text = "cond_stage_model.model."
    assert shapes[text + "transformer.resblocks.0.attn.in_proj_weight"] == [96, 32]  # 3w x w
    assert shapes[text + "transformer.resblocks.4.attn.in_proj_bias"] == [96]
    for name in ["attn.out_proj.weight", "ln_1.bias", "ln_2.weight", "mlp.c_fc.weight",
                 "mlp.c_proj.bias"]:  # fmt: skip
        assert text + "transformer.resblocks.4." + name in shapes, name
    assert shapes[text + "token_embedding.weight"] == [8514, 32]
    assert shapes[text + "positional_embedding"] == [77, 32] and text + "ln_final.bias" in shapes
    assert text + "text_projection" not in shapes  # CLIPTextModel has no projection
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in shapes
    assert layout_of_keys(shapes) == "sd2"
    reloaded = StableDiffusionPipeline.from_single_file(
        str(sd2_file), config=str(tiny_sd2_dir), local_files_only=True
    )
    _assert_same_components(
        StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, local_files_only=True), reloaded
    )


def test_sdxl_file_has_the_two_embedder_layout(sdxl_file, tiny_sdxl_dir):
    """SDXL: label_emb for the size conditioning, CLIP under embedders.0, OpenCLIP with its
    (width, projection) text_projection under embedders.1; diffusers reads it back exactly."""
    original = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    shapes = _header(sdxl_file)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")
    assert all(k.startswith(prefixes) for k in shapes)
    # (time embedding 4 * 32, pooled projection 24 + six sizes * 8)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == [128, 72]
    assert "model.diffusion_model.label_emb.0.2.bias" in shapes
    # the mid block and the second level carry two transformer blocks each
    assert "model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k.weight" in shapes
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.ff.net.2.bias" in shapes
    clip, open_clip = (
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    )
    assert shapes[clip + "embeddings.position_embedding.weight"] == [77, 32]
    assert shapes[open_clip + "positional_embedding"] == [77, 48]
    assert shapes[open_clip + "transformer.resblocks.2.attn.in_proj_weight"] == [144, 48]
    with safe_open(str(sdxl_file), framework="pt") as f:
        projection = f.get_tensor(open_clip + "text_projection")
    assert torch.equal(projection, original.text_encoder_2.text_projection.weight.T)  # (48, 24)
    assert layout_of_keys(shapes) == "sdxl"
    reloaded = StableDiffusionXLPipeline.from_single_file(
        str(sdxl_file), config=str(tiny_sdxl_dir), local_files_only=True
    )
    _assert_same_components(original, reloaded)


def test_layout_follows_the_pipeline_unless_given(tiny_pipeline_dir, tiny_sd2_dir, tmp_path):
    sd1 = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    sd2 = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, local_files_only=True)
    assert (checkpoint_layout(sd1), checkpoint_layout(sd2)) == ("sd1", "sd2")
    assert layout_of_keys(_header(save_single_file(sd1, tmp_path / "a.safetensors"))) == "sd1"
    # an explicit layout wins over the activation rule
    forced = save_single_file(sd2, tmp_path / "b.safetensors", layout="sd1")
    assert layout_of_keys(_header(forced)) == "sd1"
    with pytest.raises(ValueError, match="text_encoder_2"):
        save_single_file(sd2, tmp_path / "c.safetensors", layout="sdxl")
    with pytest.raises(ValueError, match="layout must be one of"):
        save_single_file(sd2, tmp_path / "d.safetensors", layout="sd3")
    assert layout_of_keys(["model.diffusion_model.out.2.bias"]) is None


def _meta_models(folder):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = None
        if (folder / "text_encoder_2").is_dir():
            config_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            text_2 = CLIPTextModelWithProjection(config_2)
    return unet, text, text_2


@pytest.mark.parametrize(
    ("folder", "family", "open_clip_prefix"),
    [
        (sd2_config_dir(), "v2", "cond_stage_model.model."),
        (sdxl_config_dir(), "xl_base", "conditioner.embedders.1.model."),
    ],
    ids=["sd2", "sdxl"],
)
def test_ldm_names_of_full_size_sd2_and_sdxl_invert_diffusers_own_conversion(
    folder, family, open_clip_prefix
):
    """Full-size SD 2.1 / SDXL UNet and OpenCLIP encoder on the meta device: diffusers
    recognises the family from our names, and its LDM->diffusers converters give back exactly
    the models' own names and shapes (SDXL's 32-block bigG with its projection too)."""
    unet, text, text_2 = _meta_models(folder)
    open_clip = text_2 if text_2 is not None else text
    ldm_unet = unet_to_ldm(unet)
    ldm_text = open_clip_to_ldm(open_clip, open_clip_prefix)
    assert infer_diffusers_model_type({**ldm_unet, **ldm_text}) == family
    back = convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))
    own = unet.state_dict()
    assert back.keys() == own.keys() and all(back[k].shape == own[k].shape for k in own)
    back = convert_open_clip_checkpoint(open_clip, ldm_text, prefix=open_clip_prefix)
    own = open_clip.state_dict()
    if text_2 is None:  # transformers 5 flattened CLIPTextModel, diffusers strips the level
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert back.keys() == own.keys() and all(back[k].shape == own[k].shape for k in own)
