"""training.inputs: a batch's draws made into latents, noise, timesteps and masks, from the
latent cache or through the VAE as the example trains, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sai_diffusion import config
from sai_diffusion.training import recipe
from tests.helpers import make_concept


def _square_concept(root: Path) -> Path:
    """Four 64 x 64 images, each with a mask whose left third is the subject: a flip moves it."""
    concept = make_concept(root, n=4, layout="mix")
    (root / "data" / "mask").mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (30 + 50 * i, 90, 200 - 40 * i)).save(
            root / "data" / "image" / f"img{i}.png"
        )
        mask = np.zeros((64, 64), np.uint8)
        mask[:, : 20 + 2 * i] = 255
        Image.fromarray(mask).save(root / "data" / "mask" / f"img{i}.png")
    return concept


def _setup(concept, base, out, *settings):
    flags = {"base_model": str(base), "resolution": 64, "max_steps": 4, "batch_size": 2}
    cfg, c = config.resolve(str(concept), flags, ["validation_seeds=[]", *settings])
    return recipe.setup(cfg, c, out)


def test_an_example_flips_the_same_with_the_latent_cache_on_or_off(tiny_pipeline_dir, tmp_path):
    """Guards the flip's two owners: the cached path flipped by the batch's draw, the VAE path
    by the dataset's own generator. Square images at their centre crop: the two paths see the
    same pixels, so masks equal exactly and latents to the VAE's batch rounding."""
    concept = _square_concept(tmp_path / "c")
    cached = _setup(concept, tiny_pipeline_dir, tmp_path / "a", "center_crop=true")
    direct = _setup(concept, tiny_pipeline_dir, tmp_path / "b", "center_crop=true",
                    "cache_latents=false")  # fmt: skip
    flips = []
    for step in range(6):
        batch = cached.batches.batch(step, 0)
        flips += [d.flip for d in batch.examples]
        a, b = cached.inputs(batch), direct.inputs(direct.batches.batch(step, 0))
        assert torch.equal(a.mask, b.mask), step
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
        for d, mask in zip(batch.examples, a.mask, strict=True):  # the subject on its side
            left, right = mask[0, :, :16].mean(), mask[0, :, -16:].mean()
            assert (right > left) == d.flip
    assert True in flips and False in flips


def test_latents_are_the_posterior_sample_of_each_example_scaled(tiny_pipeline_dir, tmp_path):
    """latents = (mean + std * the example's posterior draw) * the VAE's scaling factor, the
    posterior of the image as the example flips it."""
    concept = _square_concept(tmp_path / "c")
    run = _setup(concept, tiny_pipeline_dir, tmp_path / "a", "center_crop=true")
    batch = run.batches.batch(2, 0)
    inputs = run.inputs(batch)
    vae = run.pipe.vae
    for d, latents in zip(batch.examples, inputs.latents, strict=True):
        item = run.inputs.images.load(d.index, geometry=d.geometry(), flip=d.flip)
        with torch.no_grad():
            dist = vae.encode(item["pixel_values"][None]).latent_dist
        want = (dist.mean[0] + dist.std[0] * d.posterior) * vae.config.scaling_factor
        torch.testing.assert_close(latents, want, rtol=0, atol=1e-5)
    assert torch.equal(inputs.noise, torch.stack([d.noise for d in batch.examples]))
    assert inputs.timesteps.tolist() == [d.timestep for d in batch.examples]
    assert inputs.valid is None  # the crop: the whole square is the image


@pytest.mark.parametrize("cache", ["true", "false"])
def test_class_examples_are_encoded_beside_the_concepts(cache, tiny_pipeline_dir, tmp_path):
    concept = _square_concept(tmp_path / "c")
    dogs = tmp_path / "dogs"
    dogs.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 64), (10 + 60 * i, 120, 40)).save(dogs / f"dog{i}.png")
    run = _setup(concept, tiny_pipeline_dir, tmp_path / "a", f"class_data={dogs}",
                 f"cache_latents={cache}")  # fmt: skip
    inputs = run.inputs(run.batches.batch(0, 0))
    assert inputs.latents.shape[0] == 4 and inputs.prior_from == 2
    assert inputs.captions[2:] == ["a photo of dog"] * 2
    assert torch.equal(inputs.mask[2:], torch.ones_like(inputs.mask[2:]))  # no class masks
