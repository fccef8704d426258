"""The training objective: each sample's noise-prediction error, mask-weighted, optionally
min-SNR weighted (Hang et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models, SD 1.5) or the velocity
    (v-prediction models)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,): the mean squared error of each sample in fp32. With a (B, 1, H, W) pixel mask the
    mean is weighted: each latent cell counts by the share of its pixels inside the mask."""
    err = (pred.float() - target.float()) ** 2  # (B, C, h, w)
    if mask is None:
        return err.mean((1, 2, 3))
    weight = downsample_mask(mask, tuple(err.shape[-2:]))  # (B, 1, h, w)
    return (err * weight).sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * err.shape[1]).clamp_min(1e-6)


def downsample_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Area-average a (B, 1, H, W) pixel mask to the latent grid: (B, 1, h, w).

    Each latent cell gets the fraction of its pixels inside the mask, the weight its
    noise-prediction error should carry in a mask-weighted loss.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) == tuple(latent_hw):
        return mask
    return F.adaptive_avg_pool2d(mask, latent_hw)


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,): min(SNR, gamma) / SNR for epsilon prediction, / (SNR + 1) for v-prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
