"""training.loss: the masked noise-prediction error and min-SNR weighting, against hand
computations in float64 (tolerance: fp32 rounding, rtol 1e-6)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sai_diffusion.training.loss import (
    downsample_mask,
    min_snr_weight,
    per_sample_mse,
    prediction_target,
)


def test_downsample_mask_is_the_area_average():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :4, :4] = 1.0  # exactly one latent cell of 4x4 pixels
    mask[1, :, :2, :4] = 1.0  # half of one cell
    small = downsample_mask(mask, (4, 4))
    assert small.shape == (2, 1, 4, 4)
    assert small[0, 0, 0, 0] == 1.0 and small[1, 0, 0, 0] == 0.5
    assert small.sum() == 1.5  # all other cells are empty
    # An all-ones mask stays all ones, even when the sizes do not divide.
    assert torch.equal(downsample_mask(torch.ones(1, 1, 10, 10), (4, 4)), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        downsample_mask(torch.ones(1, 10, 10), (4, 4))


def test_masked_mse_weights_each_latent_cell_by_its_mask_share():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :8, :] = 1.0  # sample 0: the top half of the image
    mask[1] = 1.0  # sample 1: all of it
    got = per_sample_mse(pred, target, mask)

    err = (pred.double() - target.double()) ** 2
    want0 = err[0, :, :2, :].mean()  # the top 2 of 4 latent rows, every channel
    want1 = err[1].mean()
    torch.testing.assert_close(got.double(), torch.stack([want0, want1]), rtol=1e-6, atol=0)
    torch.testing.assert_close(per_sample_mse(pred, target), err.mean((1, 2, 3)).float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_min_snr_gamma_over_snr(prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 250, 999])
    got = min_snr_weight(sched, timesteps, gamma=5.0)

    alpha_bar = sched.alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)  # Hang et al. 2023: SNR(t) = alpha_bar / (1 - alpha_bar)
    divisor = snr + 1 if prediction_type == "v_prediction" else snr
    want = torch.minimum(snr, torch.full_like(snr, 5.0)) / divisor
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert got[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else float(want[-1]))


def test_the_target_is_the_noise_or_the_velocity():
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([100, 900])
    eps = DDPMScheduler(num_train_timesteps=1000)
    assert prediction_target(eps, latents, noise, t) is noise
    v = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = a.sqrt() * noise - (1 - a).sqrt() * latents  # v = sqrt(a) eps - sqrt(1 - a) x0
    torch.testing.assert_close(prediction_target(v, latents, noise, t), want)
