"""miniature.tiny: tiny SD 1.5, SD 2.x and SDXL-architecture pipelines with random weights."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sai_diffusion.miniature.tiny import (
    build_tiny_pipeline,
    build_tiny_sd2_pipeline,
    build_tiny_sdxl_pipeline,
)
from tests.helpers import assert_same_weights


def test_tiny_pipeline_is_deterministic_by_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_pipeline(seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    assert_same_weights(a, build_tiny_pipeline(seed=0))
    b = build_tiny_pipeline(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_tiny_pipeline_options():
    pipe = build_tiny_pipeline(unet_channels=(16, 32, 32), scheduler="ddpm", num_merges=100)
    assert list(pipe.unet.config.down_block_types) == [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
    ]  # fmt: skip
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.scheduler.config.clip_sample is False  # SD 1.5's schedule, latents unclipped
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 614
    with pytest.raises(ValueError, match="scheduler"):
        build_tiny_pipeline(scheduler="euler")


def test_tiny_pipeline_has_sd15_structure(tiny_pipeline_dir):
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    unet, text = pipe.unet.config, pipe.text_encoder.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(unet.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert unet.cross_attention_dim == text.hidden_size == 32
    assert text.num_hidden_layers == 5 and text.vocab_size == len(pipe.tokenizer)
    assert text.max_position_embeddings == pipe.tokenizer.model_max_length == 77
    assert text.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.vae.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    assert pipe.safety_checker is None
    # everyday prompt words are single tokens
    words = pipe.tokenizer.tokenize("a pencil sketch of a man holding a wand")
    assert "sketch</w>" in words and "holding</w>" in words


def test_tiny_pipeline_samples_64px_images(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a pencil sketch of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    image = out.images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all() and (image <= 1).all())


# ------------------------------------------------------------------------------ SD 2.x, SDXL
def _sample(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a pencil sketch of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images[0]


def test_tiny_sd2_pipeline_has_sd2_structure_and_samples(tmp_path):
    """Saved and reloaded, it is an SD 2.x pipeline: linear projections, v-prediction DDIM,
    exact-GELU text encoder, "!" padding; and it samples 64 px images."""
    build_tiny_sd2_pipeline(tmp_path / "sd2")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd2", local_files_only=True)
    unet, text = pipe.unet.config, pipe.text_encoder.config
    assert unet.use_linear_projection and unet.upcast_attention
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert unet.cross_attention_dim == text.hidden_size and text.hidden_act == "gelu"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert text.pad_token_id == 0 and text.eos_token_id == pipe.tokenizer.eos_token_id
    image = _sample(pipe)
    assert image.shape == (64, 64, 3) and bool((image >= 0).all() and (image <= 1).all())


def test_tiny_sdxl_pipeline_has_sdxl_structure_and_samples(tmp_path):
    """Saved and reloaded, it is an SDXL pipeline: two encoders (the second with a non-square
    projection and "!" padding), text_time conditioning sized from them, transformer depth
    per level, SDXL's VAE scale; and it samples 64 px images."""
    build_tiny_sdxl_pipeline(tmp_path / "sdxl")
    index = json.loads((tmp_path / "sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", local_files_only=True)
    unet, text, text_2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == text.hidden_size + text_2.hidden_size == 80
    assert unet.projection_class_embeddings_input_dim == text_2.projection_dim + 6 * 8
    assert pipe.text_encoder_2.text_projection.weight.shape == (24, 48)  # (proj, width)
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert len(pipe.unet.mid_block.attentions[0].transformer_blocks) == 2
    assert (text.hidden_act, text_2.hidden_act) == ("quick_gelu", "gelu")
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.vae.config.scaling_factor == 0.13025
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    image = _sample(pipe)
    assert image.shape == (64, 64, 3) and bool((image >= 0).all() and (image <= 1).all())


@pytest.mark.parametrize("build", [build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline])
def test_tiny_sd2_and_sdxl_are_deterministic_by_seed_and_leave_global_rng_alone(build):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build(seed=0, num_merges=100)
    assert torch.equal(torch.rand(1), expected_next)
    b = build(seed=0, num_merges=100)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(a, name):
            sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    c = build(seed=1, num_merges=100)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_tiny_sdxl_rejects_per_level_lists_of_the_wrong_length():
    with pytest.raises(ValueError, match="one entry per level"):
        build_tiny_sdxl_pipeline(transformer_layers_per_block=(1, 2, 3))
