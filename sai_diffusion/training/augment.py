"""Augmentation: a concept image, its mask and its caption as one training example sees them.

``ConceptImages`` turns image i into tensors given its draws (``batches``): it owns no
randomness. Two augmentations make the squares: "crop" (shorter side to the resolution, then a
square crop; with buckets, a crop of the bucket's size) and Mix-of-Show's "resize-crop-pad"
(maybe crop, shrink the whole to fit, paste at a random place on black, the pasted area
returned as ``valid``). ``augment_caption`` shuffles a caption's comma-separated phrases and
wraps it in a random phrasing such as "a photo of {}".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..files.concept_data import Example, check_mask_size, load_image, load_mask

AUGMENTATIONS = ("crop", "resize-crop-pad")

# Neutral phrasings, fit for a person or an object, in the manner of textual inversion's
# prompt list; each holds "{}" once, where the caption goes.
CAPTION_TEMPLATES = (
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a rendition of {}",
    "a close-up photo of {}",
    "a cropped photo of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a good photo of {}",
    "a bad photo of {}",
    "a blurry photo of {}",
    "a sharp photo of {}",
    "a small photo of {}",
    "a large photo of {}",
    "a snapshot of {}",
    "a photograph showing {}",
)


# --------------------------------------------------------------------------- captions


def augment_caption(
    caption: str, rng: np.random.Generator, *, shuffle: bool, keep_tokens: int, templates: bool
) -> str:
    """The caption with its phrases shuffled and/or wrapped in one of ``CAPTION_TEMPLATES``.

    ``shuffle`` splits on commas, drops empty phrases and shuffles all but the first
    ``keep_tokens`` (which hold the concept token, usually), joined again with ", ".
    ``templates`` puts the result where a random template says "{}". The draws come in a fixed
    order, the permutation and then the template; with both off the caption is returned as is.

    Raises ValueError when keep_tokens is negative (the config refuses it for users).
    """
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if shuffle:
        phrases = [part.strip() for part in caption.split(",")]
        phrases = [phrase for phrase in phrases if phrase]
        kept, rest = phrases[:keep_tokens], phrases[keep_tokens:]
        caption = ", ".join(kept + [rest[i] for i in rng.permutation(len(rest))])
    if templates:
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        caption = template.replace("{}", caption)  # not format(): braces in captions stay
    return caption


# --------------------------------------------------------------------------- pixels
def _resize_to_cover(
    image: Image.Image, width: int, height: int, resample: Image.Resampling
) -> Image.Image:
    """The image scaled, aspect kept, to the smallest size covering width x height (for a
    square target: the shorter side to its side); returned as is when that is its size."""
    image_width, image_height = image.size
    scale = max(width / image_width, height / image_height)
    new_size = (max(width, round(image_width * scale)), max(height, round(image_height * scale)))
    return image if new_size == image.size else image.resize(new_size, resample=resample)


def _fit_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled to fit the size x size square: the shorter side to size - 1
    unless the longer side would then pass size (torchvision's resize(size - 1, max_size=size),
    which Mix-of-Show uses; a square becomes (size - 1) x (size - 1)). Rounded, at least 1."""
    scale = min((size - 1) / min(width, height), size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _crop(
    image: Image.Image,
    mask: Image.Image | None,
    rng: np.random.Generator,
    *,
    width: int,
    height: int,
    center: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[int, int]]:
    """A width x height crop of the image (already covering it, ``_resize_to_cover``) and of
    its mask.

    Returns pixels (H, W, 3) in [0, 255], mask weights (H, W) in [0, 255] or None, the
    valid area (H, W), all ones, and the crop's (top, left). Draws: the crop's top, then its
    left (even when centred).
    """
    image_width, image_height = image.size
    top = int(rng.integers(0, image_height - height + 1))
    left = int(rng.integers(0, image_width - width + 1))
    if center:
        top, left = (image_height - height) // 2, (image_width - width) // 2
    rows, cols = slice(top, top + height), slice(left, left + width)
    pixels = np.asarray(image, dtype=np.float32)[rows, cols]
    weights = None if mask is None else np.asarray(mask, dtype=np.float32)[rows, cols]
    return pixels, weights, np.ones((height, width), dtype=np.float32), (top, left)


def _resize_crop_pad(
    image: Image.Image,
    mask: Image.Image | None,
    rng: np.random.Generator,
    *,
    size: int,
    crop_p: float,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Mix-of-Show's HumanResizeCropFinalV3 on an image whose short side is already size.

    With probability crop_p it crops: a portrait keeps its top (a person's head), full width
    and a random height in [width, height]; any other image a random size x size square. The
    image, cropped or whole, is then shrunk to fit the square (``_fit_size``) and pasted at a
    random place on black. Returns pixels (R, R, 3) in [0, 255], mask weights (R, R) in
    [0, 255] or None, and the valid area (R, R): 1 where pasted, 0 elsewhere; the mask is 0
    outside it too. Draws, whatever the branch: crop or not, the crop's top, its left, the
    paste's top, its left.
    """
    width, height = image.size
    crop = bool(rng.random() < crop_p)
    # A portrait's width is size, so `top` (in [0, height - width]) is its extra kept height.
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    if crop:
        box = (0, 0, width, width + top) if height > width else (left, top, left + size, top + size)
        image = image.crop(box)
        mask = None if mask is None else mask.crop(box)

    fitted = _fit_size(*image.size, size)
    if fitted != image.size:
        image = image.resize(fitted, resample=Image.Resampling.BICUBIC)
        mask = None if mask is None else mask.resize(fitted, resample=Image.Resampling.BILINEAR)
    pasted_width, pasted_height = fitted
    paste_top = int(rng.integers(0, size - pasted_height + 1))
    paste_left = int(rng.integers(0, size - pasted_width + 1))

    rows = slice(paste_top, paste_top + pasted_height)
    cols = slice(paste_left, paste_left + pasted_width)
    pixels = np.zeros((size, size, 3), dtype=np.float32)  # black: -1 once normalised
    pixels[rows, cols] = np.asarray(image, dtype=np.float32)
    valid = np.zeros((size, size), dtype=np.float32)
    valid[rows, cols] = 1.0
    weights = None
    if mask is not None:
        weights = np.zeros((size, size), dtype=np.float32)
        weights[rows, cols] = np.asarray(mask, dtype=np.float32)
    return pixels, weights, valid


class ConceptImages:
    """The concept's images as tensors: a pure transform of (image i, its draws).

    ``load(i, geometry=rng, flip=...)`` returns a dict: ``pixel_values`` (3, H, W) float in
    [-1, 1], ``mask`` (1, H, W) float in [0, 1] (ones over the image when it has no mask),
    ``valid`` (1, H, W) float, 1 where the square shows the image and 0 on padding,
    ``time_ids`` (6,) float, SDXL's size conditioning (the image file's height and width, the
    crop's top and left in the resized image, mirrored with the flip, and the target's height
    and width; resize-crop-pad's paste counts as a crop at (0, 0)), ``time_ids_mirrored``
    (those of the same crop with the other flip), ``caption`` str. The image
    is resized so it covers the target (bicubic; bilinear for the mask), then

    - ``augmentation="crop"``: cropped to the target, at a random place drawn from ``geometry``
      (its top, then its left; centred with ``center_crop``, the draws still taken); ``valid``
      is all ones;
    - ``augmentation="resize-crop-pad"`` (Mix-of-Show's): cropped with probability ``crop_p``,
      shrunk to fit and pasted on black at a random place (``_resize_crop_pad``);
      ``center_crop`` does not apply;

    and mirrored when ``flip``; image, mask and valid area get the same crop, paste and flip.
    The target is the ``resolution`` square, or with ``sizes`` (aspect-ratio buckets,
    ``buckets.assign_buckets``; "crop" only) image i's own (W, H). ``batches`` owns every draw,
    so the same draws give the same tensors wherever and whenever they are made.

    Raises:
        ValueError: no examples, or a setting out of range (the config checks users' values).
        UserError: an image or mask that can no longer be read (``files.concept_data``).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        resolution: int,
        augmentation: str = "crop",
        crop_p: float = 0.5,
        center_crop: bool = False,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if not examples:
            raise ValueError("ConceptImages needs at least one example")
        if resolution <= 0 or augmentation not in AUGMENTATIONS or not 0.0 <= crop_p <= 1.0:
            raise ValueError(
                f"resolution {resolution} (> 0), augmentation {augmentation!r} (one of "
                f"{AUGMENTATIONS}), crop_p {crop_p} (in [0, 1])"
            )
        if sizes is not None:
            if augmentation != "crop" or len(sizes) != len(examples):
                raise ValueError(
                    f"sizes: one (width, height) per example ({len(examples)}), with "
                    f"augmentation crop; got {len(sizes)} with {augmentation!r}"
                )
            sizes = [(int(w), int(h)) for w, h in sizes]
        self.examples = list(examples)
        self.resolution = resolution
        self.augmentation = augmentation
        self.crop_p = crop_p
        self.center_crop = center_crop
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.examples)

    def size(self, index: int) -> tuple[int, int]:
        """Image ``index``'s (width, height) once loaded: its bucket, or the square."""
        return (self.resolution,) * 2 if self.sizes is None else self.sizes[index]

    def at_size(self, size: tuple[int, int]) -> ConceptImages:
        """These images, every one cropped to ``size`` (a bucket's): class images in a
        bucketed batch."""
        return ConceptImages(self.examples, resolution=self.resolution, center_crop=self.center_crop,
                             sizes=[size] * len(self.examples))  # fmt: skip

    def load(self, index: int, *, geometry: np.random.Generator, flip: bool) -> dict:
        """Image ``index`` as tensors (class docstring); ``geometry`` is consumed."""
        example = self.examples[index]
        image = load_image(example.image_path)
        mask = None
        if example.mask_path is not None:
            mask = load_mask(example.mask_path)
            # checked at discovery too; the files may have changed since
            check_mask_size(example.mask_path, mask.size, example.image_path, image.size)

        width, height = self.size(index)
        original = image.size
        image = _resize_to_cover(image, width, height, Image.Resampling.BICUBIC)
        if mask is not None:
            mask = _resize_to_cover(mask, width, height, Image.Resampling.BILINEAR)
        if self.augmentation == "crop":
            pixels, weights, valid, (top, left) = _crop(
                image, mask, geometry, width=width, height=height, center=self.center_crop
            )
            lefts = (left, image.size[0] - width - left)  # as the image, as its mirror has it
        else:  # "resize-crop-pad", never with sizes: the target is the square
            pixels, weights, valid = _resize_crop_pad(
                image, mask, geometry, size=self.resolution, crop_p=self.crop_p
            )
            top, lefts = 0, (0, 0)
        time_ids = [torch.tensor([original[1], original[0], top, x, height, width],
                                 dtype=torch.float32) for x in lefts]  # fmt: skip
        if flip:
            time_ids.reverse()

        pixel_values = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)
        valid_values = torch.from_numpy(valid).unsqueeze(0)  # (1, H, W)
        if weights is None:  # no mask file: the whole image is the subject
            mask_values = valid_values.clone()
        else:
            mask_values = torch.from_numpy(weights / 255.0).unsqueeze(0)  # (1, H, W)
        if flip:
            pixel_values = pixel_values.flip(-1)
            mask_values = mask_values.flip(-1)
            valid_values = valid_values.flip(-1)
        return {
            "pixel_values": pixel_values.contiguous(),
            "mask": mask_values.contiguous(),
            "valid": valid_values.contiguous(),
            "time_ids": time_ids[0],
            "time_ids_mirrored": time_ids[1],  # what the other flip of this crop has
            "caption": example.caption,
        }
