"""A batch's draws made into the tensors the objective reads: latents, noise, timesteps, masks.

The latents of an example are the VAE posterior's mean + std * its posterior draw, times the
family's latent scale. With ``cache_latents`` the posterior of every image is encoded once, at
its centre crop (of its bucket), unflipped and flipped (``LatentCache``); otherwise each
example's image is augmented with its own draws (``augment.ConceptImages``) and encoded as it
trains. Either way an example flips as its ``Draws.flip`` says, so the two paths train the same
flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..files.concept_data import Example, non_square_images
from .augment import ConceptImages
from .batches import Batch, Draws, Size
from .streams import geometry_rng


@dataclass
class Inputs:
    """One micro-batch as the objective reads it: B examples, the concept's then the class
    images' (from ``prior_from``)."""

    latents: torch.Tensor  # (B, C, h, w), scaled for the UNet
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,) int64
    mask: torch.Tensor  # (B, 1, H, W) the subject masks in pixels
    valid: torch.Tensor | None  # (B, 1, H, W) the pasted area of resize-crop-pad, else None
    captions: list[str]
    prior_from: int
    # (B, 6) SDXL's size conditioning of each example (``augment.ConceptImages``); read by the
    # SDXL family only
    time_ids: torch.Tensor | None = None


@dataclass
class EncodedImages:
    """A set of images encoded once at their centre crop: per image, the posterior's mean and
    std (2, C, h, w), the mask (2, 1, H, W) and the size conditioning (2, 6), unflipped then
    flipped."""

    mean: list[torch.Tensor]
    std: list[torch.Tensor]
    mask: list[torch.Tensor]
    time_ids: list[torch.Tensor]


@torch.no_grad()
def encode_fixed(vae: nn.Module, images: ConceptImages, device) -> EncodedImages:
    """Every image of ``images`` at its centre crop (of its size), through the VAE."""
    fixed = ConceptImages(images.examples, resolution=images.resolution, center_crop=True,
                          sizes=images.sizes)  # fmt: skip
    out = EncodedImages([], [], [], [])
    for i in range(len(fixed)):
        # a centred crop takes its draws all the same: any stream will do
        item = fixed.load(i, geometry=geometry_rng(0, 0, i), flip=False)
        pixels = torch.stack([item["pixel_values"], item["pixel_values"].flip(-1)])
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        out.mean.append(dist.mean.float().cpu())
        out.std.append(dist.std.float().cpu())
        out.mask.append(torch.stack([item["mask"], item["mask"].flip(-1)]))
        out.time_ids.append(torch.stack([item["time_ids"], item["time_ids_mirrored"]]))
    return out


class LatentCache:
    """Encoded images by (set, size): the concept's images once, the class images once per
    bucket size they are cropped to (``ConceptImages.at_size``)."""

    def __init__(self, vae: nn.Module, device) -> None:
        self.vae, self.device = vae, device
        self._encoded: dict[tuple[str, Size | None], EncodedImages] = {}

    def get(self, name: str, images: ConceptImages, size: Size | None = None) -> EncodedImages:
        key = (name, size)
        if key not in self._encoded:
            self._encoded[key] = encode_fixed(self.vae, images, self.device)
        return self._encoded[key]


class InputBuilder:
    """Makes ``Inputs`` of a ``Batch``: cached latents or the VAE, the family's latent scale.

    ``images``: the concept's images (with their buckets); ``class_images``: prior
    preservation's, square (cropped to a batch's bucket when it has one); ``cache``: a
    ``LatentCache``, or None to encode each example as it trains; ``keep_valid``: pass the
    pasted area on (resize-crop-pad).
    """

    def __init__(
        self,
        vae: nn.Module,
        *,
        scale: float,
        device,
        images: ConceptImages,
        class_images: ConceptImages | None = None,
        cache: LatentCache | None = None,
        keep_valid: bool = False,
    ) -> None:
        self.vae, self.scale, self.device = vae, scale, device
        self.images, self.class_images = images, class_images
        self.cache, self.keep_valid = cache, keep_valid

    def encode_all(self) -> None:
        """Fill the cache with the concept's images now (before training starts)."""
        if self.cache is not None:
            self.cache.get("concept", self.images)

    def __call__(self, batch: Batch) -> Inputs:
        parts = [self._part("concept", self.images, None, batch.concept)]
        if batch.classes:  # encoded apart, as their own VAE call
            bucketed = batch.size != (self.images.resolution,) * 2
            images = self.class_images.at_size(batch.size) if bucketed else self.class_images
            parts.append(self._part("class", images, batch.size if bucketed else None,
                                    batch.classes))  # fmt: skip
        latents, mask, valid, time_ids = (torch.cat([p[i] for p in parts]) for i in range(4))
        examples = batch.examples
        return Inputs(
            latents=latents * self.scale,
            noise=torch.stack([d.noise for d in examples]),
            timesteps=torch.tensor([d.timestep for d in examples]),
            mask=mask,
            valid=valid if self.keep_valid else None,
            captions=[d.caption for d in examples],
            prior_from=batch.prior_from,
            time_ids=time_ids,
        )

    def _part(
        self, name: str, images: ConceptImages, size: Size | None, draws: Sequence[Draws]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents (b, C, h, w) unscaled, mask (b, 1, H, W), valid (b, 1, H, W), time ids
        (b, 6)) of ``draws``."""
        posterior = torch.stack([d.posterior for d in draws])
        if self.cache is not None:
            encoded = self.cache.get(name, images, size)
            pick = [(d.index, int(d.flip)) for d in draws]  # int: a bool would mask
            mean = torch.stack([encoded.mean[i][f] for i, f in pick])
            std = torch.stack([encoded.std[i][f] for i, f in pick])
            mask = torch.stack([encoded.mask[i][f] for i, f in pick])
            time_ids = torch.stack([encoded.time_ids[i][f] for i, f in pick])
            return mean + std * posterior, mask, torch.ones_like(mask), time_ids
        items = [images.load(d.index, geometry=d.geometry(), flip=d.flip) for d in draws]
        pixels = torch.stack([it["pixel_values"] for it in items])
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            latents = dist.mean.float().cpu() + dist.std.float().cpu() * posterior
        mask = torch.stack([it["mask"] for it in items])
        valid = torch.stack([it["valid"] for it in items])
        return latents, mask, valid, torch.stack([it["time_ids"] for it in items])


def cached_crops_note(examples: Sequence[Example]) -> str | None:
    """What the latent cache drops, said once: the random crops of the non-square images
    (None when every image is square)."""
    cut = non_square_images(list(examples))
    if not cut:
        return None
    return (
        f"note: cache_latents=true encodes each image once, at its centre crop: the random "
        f"crops of the {len(cut)} non-square image(s) (of {len(examples)}, e.g. {cut[0].name}) "
        "are not trained; random flips are kept. For random crops: --set cache_latents=false "
        "(the VAE then runs every step); --set center_crop=true asks for the centre crop and "
        "silences this note"
    )
