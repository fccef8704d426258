"""The validation loss on held-out images (issue 18): which images are held out, that they are
never trained on, and that the logged figure is the objective recomputed by hand on the run's
files in a stock diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from sai_diffusion import config
from sai_diffusion.errors import UserError
from sai_diffusion.files.concept_data import discover_examples
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.models.inference import load_run
from sai_diffusion.training import recipe
from sai_diffusion.training.augment import ConceptImages
from sai_diffusion.training.held_out import split_examples, validation_timesteps
from sai_diffusion.training.streams import validation_noise
from tests.helpers import load_pipe, make_concept

FAST = ["validation_seeds=[]", "checkpoint_every=0"]


def _resolve(concept, base, *settings, steps=3):
    flags = {"base_model": str(base), "resolution": 64, "max_steps": steps, "batch_size": 2}
    return config.resolve(str(concept), flags, [*FAST, *settings])


def test_the_split_is_fixed_for_the_folder_and_leaves_images_to_train_on(tmp_path):
    examples = discover_examples(make_concept(tmp_path, n=10).parent / "data", token="<V>")
    train, held = split_examples(examples, 0.2, where="data")
    assert len(held) == 2 and len(train) == 8 and not set(train) & set(held)
    assert split_examples(examples, 0.2, where="data") == (train, held)  # no run seed in it
    assert len(split_examples(examples[:2], 0.9, where="data")[0]) == 1  # one left to train
    assert len(split_examples(examples[:3], 0.01, where="data")[1]) == 1  # one held out
    with pytest.raises(
        UserError, match="validation_split 0.5 holds out images, but the concept has 1"
    ):
        split_examples(examples[:1], 0.5, where="data")


def test_held_out_images_are_never_trained_and_their_loss_is_logged_on_schedule(
    tiny_pipeline_dir, tmp_path
):
    concept = make_concept(tmp_path / "c", n=4)
    cfg, c = _resolve(concept, tiny_pipeline_dir, "validation_split=0.25",
                      "validation_loss_every=2")  # fmt: skip
    run = recipe.setup(cfg, c, tmp_path / "run")
    (held,) = run.held_out.examples
    assert held not in run.inputs.images.examples and len(run.inputs.images) == 3
    assert held.caption in run.text.cached  # frozen encoder: the caption is cached too
    recipe.train(run)
    records = RunDir(tmp_path / "run").read_metrics()
    assert [r["step"] for r in records if "val_loss" in r] == [2, 3]  # every 2, and the last
    # the same images are held out whatever the seed
    cfg2, c2 = _resolve(concept, tiny_pipeline_dir, "validation_split=0.25", "seed=7")
    assert recipe.concept_data(cfg2, c2)[1] == [held]


def test_the_logged_validation_loss_is_the_objective_of_the_saved_files(
    tiny_pipeline_dir, tmp_path
):
    """Recomputed outside the recipe: the run's files in a stock pipeline, the held-out image's
    centre crop through the VAE, the fixed timesteps and noise, epsilon MSE averaged."""
    concept = make_concept(tmp_path / "c", n=3)
    out = tmp_path / "run"
    cfg, c = _resolve(concept, tiny_pipeline_dir, "validation_split=0.34", "lr=0.5")
    run = recipe.setup(cfg, c, out)
    recipe.train(run)
    recipe.save_outputs(run)
    logged = RunDir(out).read_metrics()[-1]["val_loss"]
    (held,) = run.held_out.examples

    pipe = load_pipe(tiny_pipeline_dir)
    load_run(pipe, out)
    images = ConceptImages([held], resolution=64, center_crop=True)
    item = images.load(0, geometry=np.random.default_rng(0), flip=False)
    with torch.no_grad():
        latents = pipe.vae.encode(item["pixel_values"][None]).latent_dist.mean
        latents = latents * pipe.vae.config.scaling_factor  # (1, 4, 8, 8)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        timesteps = validation_timesteps(sched.config.num_train_timesteps)
        assert timesteps.tolist() == [125, 375, 625, 875]
        noise = validation_noise(0, (4, *latents.shape[1:]))
        ids = pipe.tokenizer([held.caption], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids  # fmt: skip
        context = pipe.text_encoder(ids)[0].expand(4, -1, -1)
        noisy = sched.add_noise(latents.expand(4, -1, -1, -1), noise, timesteps)
        pred = pipe.unet(noisy, timesteps, context).sample
    want = ((pred - noise) ** 2).mean().item()
    assert logged == pytest.approx(want, rel=1e-5)
    # the figure moved with training by more than the tolerance above: it sees the LoRA
    base = recipe.setup(
        *_resolve(concept, tiny_pipeline_dir, "validation_split=0.34"), tmp_path / "b"
    )
    assert abs(recipe.validation_loss(base) - logged) > 4e-5 * logged


def test_validation_data_is_a_folder_beside_the_concept_and_bad_pairs_are_refused(
    tiny_pipeline_dir, tmp_path
):
    concept = make_concept(tmp_path / "c", n=2)
    held = make_concept(tmp_path / "c" / "held", n=2).parent / "data"
    cfg, c = _resolve(concept, tiny_pipeline_dir, "validation_data=held/data")
    images, held_out = recipe.concept_data(cfg, c)
    assert len(images) == 2 and [e.image_path.parent for e in held_out] == [held, held]
    with pytest.raises(UserError, match="validation.split and validation.data both"):
        _resolve(concept, tiny_pipeline_dir, "validation_data=held/data", "validation_split=0.5")
    cfg, c = _resolve(concept, tiny_pipeline_dir, "validation_data=nowhere")
    with pytest.raises(UserError, match="nowhere does not exist"):
        recipe.concept_data(cfg, c)
