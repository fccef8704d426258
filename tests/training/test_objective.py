"""training.objective: the loss of a micro-batch recomputed by hand from its parts on the tiny
model: the prediction target (noise or velocity), the masked mean, min-SNR weighting, the
prior term, the loss scale and the attention penalty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from sai_diffusion import config
from sai_diffusion.training import recipe
from sai_diffusion.training.objective import Objective
from tests.helpers import make_concept


@pytest.fixture(scope="module")
def run(tiny_pipeline_dir, tmp_path_factory):
    """A tiny run set up (not trained) on a concept whose masks are its images' left halves;
    the tests read it only."""
    tmp_path = tmp_path_factory.mktemp("objective")
    concept = make_concept(tmp_path / "c", n=3, layout="mix")
    (tmp_path / "c" / "data" / "mask").mkdir()
    for i in range(3):  # the subject: the left half of each 80 x 72 image
        mask = np.zeros((72, 80), np.uint8)
        mask[:, :40] = 255
        Image.fromarray(mask).save(tmp_path / "c" / "data" / "mask" / f"img{i}.png")
    flags = {"base_model": str(tiny_pipeline_dir), "resolution": 64, "batch_size": 2}
    cfg, c = config.resolve(str(concept), flags, ["validation_seeds=[]"])
    return recipe.setup(cfg, c, tmp_path / "run")


def _by_hand(run, inputs, scheduler, *, masked=True, gamma=0.0) -> torch.Tensor:
    """(B,) per-example errors, written out from diffusers' primitives."""
    noisy = scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    with torch.no_grad():
        context = run.pipe.text_encoder(run.pipe.tokenizer(
            inputs.captions, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids)[0]  # fmt: skip
        pred = run.pipe.unet(noisy, inputs.timesteps, context).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(inputs.latents, inputs.noise, inputs.timesteps)
    else:
        target = inputs.noise
    err = (pred - target) ** 2  # (B, 4, h, w)
    if masked:
        cells = F.adaptive_avg_pool2d(inputs.mask, err.shape[-2:])  # share of each cell inside
        per = (err * cells).sum((1, 2, 3)) / (cells.sum((1, 2, 3)) * err.shape[1])
    else:
        per = err.mean((1, 2, 3))
    if gamma:
        alphas = scheduler.alphas_cumprod[inputs.timesteps]
        snr = alphas / (1 - alphas)
        per = per * torch.clamp(snr, max=gamma) / (snr + (scheduler.config.prediction_type
                                                          == "v_prediction"))  # fmt: skip
    return per


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_is_the_masked_mse_of_the_models_target(run, prediction):
    scheduler = DDPMScheduler.from_config(run.pipe.scheduler.config, prediction_type=prediction)
    objective = Objective(run.family, scheduler, device="cpu")
    inputs = run.inputs(run.batches.batch(0, 0))
    with torch.no_grad():
        got = objective(run.unet, run.text, inputs).item()
    assert got == pytest.approx(_by_hand(run, inputs, scheduler).mean().item(), rel=1e-5)
    if prediction == "epsilon":  # the masks matter: half of each image is out
        unmasked = _by_hand(run, inputs, scheduler, masked=False).mean().item()
        assert abs(got - unmasked) > 1e-4 * got


def test_min_snr_weighting_and_the_loss_scale(run):
    scheduler = run.objective.scheduler
    inputs = run.inputs(run.batches.batch(1, 0))
    objective = Objective(run.family, scheduler, device="cpu", min_snr_gamma=5.0, loss_scale=4.0)
    with torch.no_grad():
        got = objective(run.unet, run.text, inputs).item()
    want = 4.0 * _by_hand(run, inputs, scheduler, gamma=5.0).mean().item()
    assert got == pytest.approx(want, rel=1e-5)


def test_the_prior_term_is_the_class_examples_mean_times_its_weight(run):
    """Examples from ``prior_from`` on are class examples: loss = concept mean + w * class mean."""
    scheduler = run.objective.scheduler
    inputs = run.inputs(run.batches.batch(0, 0))
    inputs.prior_from = 1  # the second example read as a class example
    per = _by_hand(run, inputs, scheduler)
    for weight in (1.0, 3.0):
        objective = Objective(run.family, scheduler, device="cpu", prior_loss_weight=weight)
        with torch.no_grad():
            got = objective(run.unet, run.text, inputs).item()
        assert got == pytest.approx((per[0] + weight * per[1]).item(), rel=1e-5)


def test_the_attention_penalty_is_added_only_where_asked(tiny_pipeline_dir, tmp_path, run):
    """With attn_reg_weight the concept word's attention outside the mask adds to the loss;
    the validation loss (attention=False) leaves it out."""
    concept = Path(run.concept.path)
    flags = {"base_model": str(tiny_pipeline_dir), "resolution": 64, "batch_size": 2}
    cfg, c = config.resolve(str(concept), flags, ["validation_seeds=[]", "attn_reg_weight=10"])
    penalised = recipe.setup(cfg, c, tmp_path / "p")
    inputs = penalised.inputs(penalised.batches.batch(0, 0))
    objective = penalised.objective
    with torch.no_grad():
        plain = objective(penalised.unet, penalised.text, inputs, attention=False).item()
        full = objective(penalised.unet, penalised.text, inputs).item()
    assert plain == pytest.approx(_by_hand(penalised, inputs, objective.scheduler).mean().item(),
                                  rel=1e-5)  # fmt: skip
    assert full > plain * (1 + 1e-3)
