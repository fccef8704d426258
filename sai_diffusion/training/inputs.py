"""A batch's draws made into the tensors the objective reads: latents, noise, timesteps, masks.

The latents of an example are the VAE posterior's mean + std * its posterior draw, times the
family's latent scale. With ``cache_latents`` the posterior of every image is encoded once, at
its centre crop (of its bucket), unflipped and flipped (``LatentCache``); otherwise each
example's image is augmented with its own draws (``augment.ConceptImages``) and encoded as it
trains. Either way an example flips as its ``Draws.flip`` says, so the two paths train the same
flips.

A micro-batch is made in two halves: ``InputBuilder.prepare`` does the host's work (decode,
resize, crop, flip and mask each image, stack its draws) into a ``HostBatch``, which worker
processes can make ahead of the training thread (``feed``); ``InputBuilder.finish`` moves it to
the device and runs the VAE there. The latent cache lives on the device, and so do the latents
and masks of every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    flipped; on the device that encoded them."""

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
        out.mean.append(dist.mean.float())
        out.std.append(dist.std.float())
        out.mask.append(torch.stack([item["mask"], item["mask"].flip(-1)]).to(device))
        out.time_ids.append(torch.stack([item["time_ids"], item["time_ids_mirrored"]]).to(device))
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
        return self.finish(self.prepare(batch))

    def prepare(self, batch: Batch) -> HostBatch:
        """The host's half of ``batch``: its images as tensors (without the cache), its draws
        stacked. Reads no module: worker processes run it."""
        parts = [self._host_part("concept", self.images, None, batch.concept)]
        if batch.classes:  # encoded apart, as their own VAE call
            bucketed = batch.size != (self.images.resolution,) * 2
            images = self.class_images.at_size(batch.size) if bucketed else self.class_images
            parts.append(self._host_part("class", images, batch.size if bucketed else None,
                                         batch.classes))  # fmt: skip
        examples = batch.examples
        return HostBatch(
            parts=parts,
            noise=torch.stack([d.noise for d in examples]),
            timesteps=torch.tensor([d.timestep for d in examples]),
            captions=[d.caption for d in examples],
            prior_from=batch.prior_from,
        )

    def _host_part(
        self, name: str, images: ConceptImages, size: Size | None, draws: Sequence[Draws]
    ) -> HostPart:
        part = HostPart(name, size, posterior=torch.stack([d.posterior for d in draws]),
                        picks=torch.tensor([[d.index, int(d.flip)] for d in draws]))  # fmt: skip
        if self.cache is None:
            items = [images.load(d.index, geometry=d.geometry(), flip=d.flip) for d in draws]
            part.pixels, part.mask, part.valid, part.time_ids = (
                torch.stack([it[key] for it in items])
                for key in ("pixel_values", "mask", "valid", "time_ids")
            )
        return part

    def finish(self, host: HostBatch) -> Inputs:
        """The device's half: ``host`` on the device (non-blocking from pinned memory), the
        latents from the cache or the VAE, scaled for the UNet."""
        parts = [self._device_part(part) for part in host.parts]
        latents, mask, valid, time_ids = (torch.cat([p[i] for p in parts]) for i in range(4))
        return Inputs(
            latents=latents * self.scale,
            noise=_to(host.noise, self.device),
            timesteps=_to(host.timesteps, self.device),
            mask=mask,
            valid=valid if self.keep_valid else None,
            captions=host.captions,
            prior_from=host.prior_from,
            time_ids=time_ids,
        )

    def _device_part(
        self, part: HostPart
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents (b, C, h, w) unscaled, mask (b, 1, H, W), valid (b, 1, H, W), time ids
        (b, 6)) of ``part``, on the device."""
        posterior = _to(part.posterior, self.device)
        if self.cache is not None:
            images = self.images if part.name == "concept" else self.class_images
            if part.size is not None:
                images = images.at_size(part.size)
            encoded = self.cache.get(part.name, images, part.size)
            pick = part.picks.tolist()  # a host tensor: no device read
            mean = torch.stack([encoded.mean[i][f] for i, f in pick])
            std = torch.stack([encoded.std[i][f] for i, f in pick])
            mask = torch.stack([encoded.mask[i][f] for i, f in pick])
            time_ids = torch.stack([encoded.time_ids[i][f] for i, f in pick])
            return mean + std * posterior, mask, torch.ones_like(mask), time_ids
        pixels = _to(part.pixels, self.device, self.vae.dtype)
        with torch.no_grad():
            dist = self.vae.encode(pixels).latent_dist
            latents = dist.mean.float() + dist.std.float() * posterior
        return (latents, _to(part.mask, self.device), _to(part.valid, self.device),
                _to(part.time_ids, self.device))  # fmt: skip


@dataclass
class HostPart:
    """The concept's or the class examples of a micro-batch, as the host makes them.

    ``picks`` (b, 2) int64: each example's image and flip (what the cache is read with);
    without the cache, the augmented images themselves: ``pixels`` (b, 3, H, W), ``mask`` and
    ``valid`` (b, 1, H, W), ``time_ids`` (b, 6)."""

    name: str  # "concept" or "class"
    size: Size | None  # the bucket the class images are cropped to, else None
    posterior: torch.Tensor  # (b, C, h, w) the posterior draws
    picks: torch.Tensor
    pixels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def pin_memory(self) -> HostPart:
        return replace(self, **{
            key: value.pin_memory()
            for key in ("posterior", "pixels", "mask", "valid", "time_ids")
            if (value := getattr(self, key)) is not None
        })  # fmt: skip


@dataclass
class HostBatch:
    """A micro-batch as the host prepares it (``InputBuilder.prepare``): plain CPU tensors and
    strings, sent from a worker process as they are. ``pin_memory()`` is what a DataLoader
    with ``pin_memory=True`` calls on it."""

    parts: list[HostPart]
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,) int64
    captions: list[str]
    prior_from: int

    def pin_memory(self) -> HostBatch:
        return replace(self, parts=[p.pin_memory() for p in self.parts],
                       noise=self.noise.pin_memory(), timesteps=self.timesteps.pin_memory())  # fmt: skip


def _to(tensor: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device``: asynchronous when it comes from pinned memory."""
    return tensor.to(device, dtype, non_blocking=tensor.is_pinned())


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
