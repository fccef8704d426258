"""miniature.tiny: tiny SD-1.5-architecture pipelines with random weights."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sai_diffusion.miniature.tiny import build_tiny_pipeline
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
