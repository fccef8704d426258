"""models.family: what differs between model families, for SD 1.x / 2.x: the conditioning
equals what diffusers' own pipeline computes, the latent geometry is the VAE's, and a model of
another family is named and refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from sai_diffusion.errors import UserError
from sai_diffusion.files.lora_files import SD_KEYS
from sai_diffusion.models.family import STABLE_DIFFUSION, family_of
from tests.helpers import load_pipe

PROMPTS = ["a pencil sketch of a dog", "a photo of a red heart on grass"]


def test_the_context_is_the_one_diffusers_pipeline_encodes(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    family = family_of(pipe)
    assert family is STABLE_DIFFUSION and family.file_keys == SD_KEYS
    with torch.no_grad():
        ours = family.encode(family.text_encoders(pipe), PROMPTS, device="cpu")
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert torch.equal(ours, theirs)


def test_the_prediction_is_the_unets_on_that_context(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    family = family_of(pipe)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        context = family.encode(family.text_encoders(pipe), PROMPTS, device="cpu")
        want = pipe.unet(noisy, timesteps, encoder_hidden_states=context).sample
        assert torch.equal(family.predict(pipe.unet, noisy, timesteps, context), want)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (32, 16)])
def test_latent_shape_and_scale_are_the_vaes(tiny_pipeline_dir, size):
    pipe = load_pipe(tiny_pipeline_dir)
    family = family_of(pipe)
    width, height = size
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, height, width)).latent_dist.mean
    assert family.latent_shape(pipe.vae, size) == tuple(latents.shape[1:])
    assert family.latent_scale(pipe.vae) == pipe.vae.config.scaling_factor
    assert family.prediction_type(pipe.scheduler) == pipe.scheduler.config.prediction_type


def test_the_sampling_pipeline_keeps_the_models_modules(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    sampler = STABLE_DIFFUSION.sampling_pipeline(pipe)
    assert sampler.unet is pipe.unet and sampler.text_encoder is pipe.text_encoder
    assert type(sampler.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert STABLE_DIFFUSION.sampling_pipeline(pipe, scheduler="native").scheduler is pipe.scheduler


def test_an_sdxl_class_unet_without_a_second_text_encoder_is_refused_by_name(tiny_pipeline_dir):
    """A UNet conditioned on time ids and pooled text (SDXL's text_time) in a pipeline with one
    text encoder (a refiner's layout) is neither SD 1.x / 2.x nor a trainable SDXL."""
    pipe = load_pipe(tiny_pipeline_dir)
    config = dict(pipe.unet.config)
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=8 * 6 + 32)  # fmt: skip
    pipe.unet = UNet2DConditionModel.from_config(config)
    with pytest.raises(UserError, match="SDXL refiner"):
        family_of(pipe)
