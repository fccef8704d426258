"""Concept images on disk -> training examples -> augmented tensors.

Two folder layouts are accepted (README, "Train a LoRA"):

    Mix-of-Show                      images with captions beside them
    data/image/a.png                 data/a.png
    data/caption/a.txt  (optional)   data/a.txt   (optional)
    data/mask/a.png     (optional)

Captions may say ``<TOK>`` where the concept token goes; an image without a caption gets the
caption template. Every image and mask is decoded once at discovery, so a broken file is
reported before training starts rather than hours into it.

Two augmentations make the squares: "crop" (shorter side to the resolution, then a square
crop) and Mix-of-Show's "resize-crop-pad" (maybe crop, shrink the whole to fit, paste at a
random place on black, the pasted area returned as ``valid``). ``augment_caption`` shuffles a
caption's comma-separated phrases and wraps it in a random phrasing such as "a photo of {}".

Aspect-ratio buckets (kohya's) train each image at about its own shape rather than a square:
``bucket_resolutions`` lists (width, height) sizes of at most resolution**2 pixels,
``assign_buckets`` gives each image (``image_sizes``) the bucket nearest its aspect ratio,
``ConceptDataset(sizes=...)`` crops each image to its bucket's size with "crop", and
``BucketBatches`` schedules batches that hold one bucket each, so their tensors stack.

Augmentation randomness comes from (seed, epoch, index) alone, never from global RNG state:
a resumed run, or a run with a different number of DataLoader workers, sees exactly the
same crops and flips; the bucket schedule comes from (seed, epoch) alone in the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
TOKEN_PLACEHOLDER = "<TOK>"
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

_LAYOUTS_HELP = (
    "Accepted layouts: Mix-of-Show (image/, with optional caption/<name>.txt and "
    "mask/<name>.png beside it), or images with optional same-name .txt captions directly in "
    f"the folder. Accepted image extensions: {', '.join(IMAGE_EXTENSIONS)} (any case)."
)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


@dataclass(frozen=True)
class Example:
    """One training image: its file, its final caption (token filled in), its optional mask."""

    image_path: Path
    caption: str
    mask_path: Path | None = None


# --------------------------------------------------------------------------- discovery


def discover_examples(
    folder: Path, *, token: str, caption_template: str = "a photo of {token}"
) -> list[Example]:
    """Find the images of a concept folder, with captions and masks, sorted by file name.

    Raises UserError for: a missing folder, no images, a caption or mask without an image,
    two images (or masks) sharing a name, an unreadable or corrupt image or mask, an empty
    caption file, a mask whose size differs from its image's, an all-black mask.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UserError(
            f"Dataset folder {folder} does not exist. Fix: point `data` in the concept "
            "config at the folder holding the concept images (relative to the YAML file)."
        )
    if not folder.is_dir():
        raise UserError(
            f"Dataset path {folder} is a file, not a folder. Fix: point `data` in the "
            "concept config at the folder holding the concept images."
        )
    template_caption = _format_template(caption_template, token)

    if (folder / "image").is_dir():
        images, captions, masks = _scan_mix_of_show(folder)
    else:
        for sub in ("caption", "mask"):
            if (folder / sub).is_dir():
                raise UserError(
                    f"Dataset folder {folder} has a {sub}/ folder but no image/ folder. "
                    f"Fix: put the images in {folder / 'image'} (Mix-of-Show layout)."
                )
        images, captions, masks = _scan_flat(folder)

    if not images:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f" Its subfolders ({', '.join(subfolders)}) are not searched." if subfolders else ""
        raise UserError(f"Dataset folder {folder} holds no images.{hint} {_LAYOUTS_HELP}")
    for kind, files in (("caption", captions), ("mask", masks)):
        orphans = sorted(set(files) - set(images))
        if orphans:
            stem = orphans[0]
            raise UserError(
                f"The {kind} file {files[stem]} has no image named {stem!r} "
                f"(expected {stem}.png, .jpg, ... in the image folder). Fix: add the image, "
                f"or rename or delete the {kind} file."
            )

    examples = []
    for stem in sorted(images, key=lambda s: images[s].name):
        image_size = _verify_image(images[stem])
        caption = template_caption
        if stem in captions:
            caption = _read_caption(captions[stem]).replace(TOKEN_PLACEHOLDER, token)
        mask_path = masks.get(stem)
        if mask_path is not None:
            _verify_mask(mask_path, image_path=images[stem], image_size=image_size)
        examples.append(Example(images[stem], caption, mask_path))
    return examples


def _scan_mix_of_show(folder: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    image_dir = folder / "image"
    for path in _visible_files(image_dir):
        if path.suffix.lower() == CAPTION_EXTENSION:
            raise UserError(
                f"Caption file {path} is inside the image/ folder, where captions are not "
                f"read. Fix: move it to {folder / 'caption' / path.name}."
            )
    images = _by_stem(image_dir, IMAGE_EXTENSIONS, kind="image")
    captions = _by_stem(folder / "caption", (CAPTION_EXTENSION,), kind="caption")
    masks = _by_stem(folder / "mask", IMAGE_EXTENSIONS, kind="mask")
    return images, captions, masks


def _scan_flat(folder: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    images = _by_stem(folder, IMAGE_EXTENSIONS, kind="image")
    captions = _by_stem(folder, (CAPTION_EXTENSION,), kind="caption")
    return images, captions, {}


def _visible_files(directory: Path) -> list[Path]:
    """Files directly in `directory`, skipping hidden ones (.DS_Store, ._a.png, ...)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _by_stem(directory: Path, extensions: tuple[str, ...], *, kind: str) -> dict[str, Path]:
    """Map file stem -> path for the files in `directory` with one of `extensions`."""
    found: dict[str, Path] = {}
    for path in _visible_files(directory):
        if path.suffix.lower() not in extensions:
            continue
        if path.stem in found:
            raise UserError(
                f"Two {kind} files share the name {path.stem!r}: {found[path.stem]} and "
                f"{path}. Fix: rename or delete one, so that each {kind} pairs with one image."
            )
        found[path.stem] = path
    return found


def _format_template(template: str, token: str) -> str:
    try:
        return template.format(token=token).replace(TOKEN_PLACEHOLDER, token)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"Caption template {template!r} cannot be filled in ({err!r}). Fix: use only "
            "the {token} placeholder, e.g. 'a photo of {token}'."
        ) from None


def _read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(
            f"Caption file {path} is not UTF-8 text. Fix: re-save it as UTF-8."
        ) from None
    caption = " ".join(text.split())  # one line, single spaces, as the tokenizer sees it
    if not caption:
        raise UserError(
            f"Caption file {path} is empty. Fix: write a caption in it, or delete it to "
            "caption the image with the caption template."
        )
    return caption


def _open_verified(path: Path, *, kind: str) -> Image.Image:
    """Open and fully decode an image file; a truncated or corrupt file is a UserError."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(
            f"The {kind} file {path} cannot be read as an image ({err}). Fix: re-export "
            "it as PNG or JPEG, or delete it."
        ) from None


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as shown, i.e. after the EXIF orientation is applied."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def _verify_image(path: Path) -> tuple[int, int]:
    return _oriented_size(_open_verified(path, kind="image"))


def _verify_mask(path: Path, *, image_path: Path, image_size: tuple[int, int]) -> None:
    mask = _open_verified(path, kind="mask")
    _check_mask_size(path, _oriented_size(mask), image_path, image_size)
    if _to_grey(mask).getextrema()[1] == 0:
        raise UserError(
            f"Mask {path} is entirely black, so the loss would ignore its image. Fix: paint "
            "the concept white in the mask, or delete the mask to train on the whole image."
        )


def _check_mask_size(
    mask_path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]
) -> None:
    """A mask weights its image pixel by pixel, so the two must be the same size (as shown)."""
    if mask_size != image_size:
        raise UserError(
            f"Mask {mask_path} is {mask_size[0]}x{mask_size[1]} pixels but its image "
            f"{image_path} is {image_size[0]}x{image_size[1]}. Fix: export the mask at the "
            "image's size."
        )


def non_square_images(examples: list[Example]) -> list[Path]:
    """The images a square crop cuts, i.e. those whose random crops differ (header reads)."""
    cut = []
    for example in examples:
        with Image.open(example.image_path) as image:
            width, height = image.size
        if width != height:
            cut.append(example.image_path)
    return cut


# --------------------------------------------------------------------------- captions


def augment_caption(
    caption: str, rng: np.random.Generator, *, shuffle: bool, keep_tokens: int, templates: bool
) -> str:
    """The caption with its phrases shuffled and/or wrapped in one of ``CAPTION_TEMPLATES``.

    ``shuffle`` splits on commas, drops empty phrases and shuffles all but the first
    ``keep_tokens`` (which hold the concept token, usually), joined again with ", ".
    ``templates`` puts the result where a random template says "{}". The draws come in a fixed
    order, the permutation and then the template; with both off the caption is returned as is.

    Raises UserError when keep_tokens is negative.
    """
    if keep_tokens < 0:
        raise UserError(
            f"keep_tokens is the number of leading phrases kept in place and must be >= 0, "
            f"got {keep_tokens}."
        )
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


def _load(path: Path, *, kind: str) -> Image.Image:
    return ImageOps.exif_transpose(_open_verified(path, kind=kind))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a transparent background is not black)."""
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: PIL's convert would clip at 255
        return _to_grey(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_grey(image: Image.Image) -> Image.Image:
    """8-bit greyscale ("L"); 16-bit inputs are rescaled rather than clipped."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(
            np.clip(np.rint(values), 0, 255).astype(np.uint8)
        )  # (H, W) uint8 -> "L"
    return image.convert("L")


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
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A width x height crop of the image (already covering it, ``_resize_to_cover``) and of
    its mask.

    Returns pixels (H, W, 3) in [0, 255], mask weights (H, W) in [0, 255] or None, and the
    valid area (H, W), all ones. Draws: the crop's top, then its left (even when centred).
    """
    image_width, image_height = image.size
    top = int(rng.integers(0, image_height - height + 1))
    left = int(rng.integers(0, image_width - width + 1))
    if center:
        top, left = (image_height - height) // 2, (image_width - width) // 2
    rows, cols = slice(top, top + height), slice(left, left + width)
    pixels = np.asarray(image, dtype=np.float32)[rows, cols]
    weights = None if mask is None else np.asarray(mask, dtype=np.float32)[rows, cols]
    return pixels, weights, np.ones((height, width), dtype=np.float32)


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


def _seeded_rng(*values: int, stream: tuple[int, ...] = ()) -> np.random.Generator:
    """A generator whose draws depend on `values` (ints, any sign) and `stream` alone.

    SeedSequence pads its entropy with zeros to four 32-bit words, so (a, b) and (a, b, 0)
    would give one stream: generators for different purposes pass different `stream` keys.
    """
    # SeedSequence wants non-negative integers; masking keeps negative seeds distinct.
    entropy = [value & 0xFFFF_FFFF_FFFF_FFFF for value in values]
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=stream))


def _checked_sizes(
    sizes: list[tuple[int, int]], n_examples: int, augmentation: str
) -> list[tuple[int, int]]:
    """ConceptDataset's per-example (width, height) targets, validated (UserError)."""
    if augmentation != "crop":
        raise UserError(
            f"Aspect-ratio buckets work with augmentation=crop, got {augmentation!r}. Fix: "
            "set augmentation to crop, or train on squares without buckets."
        )
    sizes = list(sizes)
    if len(sizes) != n_examples:
        raise UserError(
            f"sizes holds {len(sizes)} (width, height) targets for {n_examples} examples. "
            "Fix: give one target per example, in the order of the examples."
        )
    for i, size in enumerate(sizes):
        is_pair = isinstance(size, tuple | list) and len(size) == 2
        if not is_pair or not all(
            isinstance(side, int | np.integer) and not isinstance(side, bool) and side > 0
            for side in size
        ):
            raise UserError(
                f"sizes[{i}] is {size!r}, not a (width, height) pair of positive ints. Fix: "
                "give each example a target such as (512, 512)."
            )
    return [(int(width), int(height)) for width, height in sizes]


class ConceptDataset(torch.utils.data.Dataset):
    """Square (or, with ``sizes``, bucket-sized) crops of the concept images with their masks,
    as tensors.

    Each item is a dict: ``pixel_values`` (3, R, R) float in [-1, 1], ``mask`` (1, R, R) float
    in [0, 1] (ones over the image when it has no mask), ``valid`` (1, R, R) float, 1 where the
    square shows the image and 0 on padding, ``caption`` str, ``index`` int. The image is
    resized so its shorter side is R (bicubic; bilinear for the mask), then

    - ``augmentation="crop"``: cropped (randomly, or centred with ``center_crop``); ``valid``
      is all ones;
    - ``augmentation="resize-crop-pad"`` (Mix-of-Show's): cropped with probability ``crop_p``,
      shrunk to fit and pasted on black at a random place (``_resize_crop_pad``).
      ``center_crop`` applies to "crop" only and is ignored here;

    and then maybe mirrored; image, mask and valid area get the same crop, paste and flip.

    ``sizes`` (aspect-ratio buckets, see ``assign_buckets``) gives example i its own target
    (W, H) instead of (R, R), with ``augmentation="crop"`` only: the image is resized to the
    smallest size covering W x H, then cropped to it and maybe mirrored as above, so its item
    holds (3, H, W) pixels and (1, H, W) mask and valid. Items of different sizes do not
    stack: batch them with ``BucketBatches``. ``sizes`` of None is the square crop.

    Raises UserError for no examples, a bad setting, or ``sizes`` of the wrong length, with a
    side that is not a positive int, or given with "resize-crop-pad".

    The augmentation of item i depends only on (seed, epoch, i): call ``set_epoch`` at the
    start of each epoch. DataLoader workers hold a copy of the dataset, so use
    ``persistent_workers=False`` (the default) for ``set_epoch`` to reach them.
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        resolution: int,
        augmentation: str = "crop",
        crop_p: float = 0.5,
        center_crop: bool = False,
        random_flip: float = 0.5,
        seed: int = 0,
        sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        if not examples:
            raise UserError("The dataset has no examples. Fix: add images to the data folder.")
        if resolution <= 0:
            raise UserError(f"resolution must be a positive number of pixels, got {resolution}.")
        if augmentation not in AUGMENTATIONS:
            raise UserError(
                f"augmentation must be one of {', '.join(map(repr, AUGMENTATIONS))}, got "
                f"{augmentation!r}."
            )
        if not 0.0 <= crop_p <= 1.0:
            raise UserError(f"crop_p is a probability and must be in [0, 1], got {crop_p}.")
        if not 0.0 <= random_flip <= 1.0:
            raise UserError(
                f"random_flip is a probability and must be in [0, 1], got {random_flip}."
            )
        if sizes is not None:
            sizes = _checked_sizes(sizes, len(examples), augmentation)
        self.examples = list(examples)
        self.resolution = resolution
        self.augmentation = augmentation
        self.crop_p = crop_p
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.sizes = sizes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def augmentation_rng(self, index: int) -> np.random.Generator:
        """The generator for item `index` this epoch; the same triple gives the same draws."""
        return _seeded_rng(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.examples):
            raise IndexError(f"index {index} out of range for {len(self.examples)} examples")
        example = self.examples[index]
        image = _to_rgb(_load(example.image_path, kind="image"))
        mask = None
        if example.mask_path is not None:
            mask = _to_grey(_load(example.mask_path, kind="mask"))
            # checked at discovery too; the files may have changed since
            _check_mask_size(example.mask_path, mask.size, example.image_path, image.size)

        size = self.resolution
        width, height = (size, size) if self.sizes is None else self.sizes[index]
        image = _resize_to_cover(image, width, height, Image.Resampling.BICUBIC)
        if mask is not None:
            mask = _resize_to_cover(mask, width, height, Image.Resampling.BILINEAR)

        # Always draw in the same order, whatever the settings, so one setting does not
        # shift the random stream of another: the geometry's draws, then the flip.
        rng = self.augmentation_rng(index)
        if self.augmentation == "crop":
            pixels, weights, valid = _crop(
                image, mask, rng, width=width, height=height, center=self.center_crop
            )
        else:  # "resize-crop-pad", never with sizes: the target is the square
            pixels, weights, valid = _resize_crop_pad(
                image, mask, rng, size=size, crop_p=self.crop_p
            )
        flip = bool(rng.random() < self.random_flip)

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
            "caption": example.caption,
            "index": index,
        }


# --------------------------------------------------------------------------- buckets

# Stream keys (see _seeded_rng) of BucketBatches' three generators.
_ORDER_STREAM, _MEMBERS_STREAM, _FILL_STREAM = (1,), (2,), (3,)


def bucket_resolutions(resolution: int, step: int) -> list[tuple[int, int]]:
    """The (width, height) buckets for an area of resolution**2 pixels, kohya-style.

    Sides are multiples of `step` within [resolution // 2, 2 * resolution] (rounded inwards to
    multiples of step). For each width the bucket takes the tallest such height whose area
    stays within resolution**2, kept when that height is within the bounds, together with its
    transpose; plus the square. Sorted by aspect ratio width / height, ascending.

    Raises ValueError unless step >= 1 and resolution is a positive multiple of step.
    """
    if step < 1 or resolution <= 0 or resolution % step:
        raise ValueError(
            f"resolution must be a positive multiple of step >= 1, got resolution "
            f"{resolution} and step {step}."
        )
    area = resolution * resolution
    min_side = -(-(resolution // 2) // step) * step  # ceil to a multiple of step
    max_side = 2 * resolution // step * step
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda bucket: (bucket[0] / bucket[1], bucket[0]))


def image_sizes(examples: list[Example]) -> list[tuple[int, int]]:
    """Each example's image (width, height) as shown, EXIF orientation applied (header reads)."""
    sizes = []
    for example in examples:
        with Image.open(example.image_path) as image:
            sizes.append(_oriented_size(image))
    return sizes


def assign_buckets(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    """For each (width, height), the index of the bucket nearest its aspect ratio.

    Nearest means the least |log(w / h) - log(bw / bh)|, compared exactly (as the ratio
    max(x / b, b / x) of the two aspect ratios); ties go to the larger area, then the lower
    index. A square image lands in the square bucket, the only one of ratio 1.

    Raises ValueError for no buckets.
    """
    if not buckets:
        raise ValueError("assign_buckets needs at least one bucket.")
    bucket_ratios = [Fraction(width, height) for width, height in buckets]
    areas = [width * height for width, height in buckets]
    assigned = []
    for width, height in sizes:
        ratio = Fraction(width, height)
        nearness = [  # (distance as a ratio >= 1, larger area first, lower index first)
            (max(ratio / bucket_ratio, bucket_ratio / ratio), -area, i)
            for i, (bucket_ratio, area) in enumerate(zip(bucket_ratios, areas, strict=True))
        ]
        assigned.append(min(nearness)[2])
    return assigned


class BucketBatches:
    """The deterministic batch schedule of a bucketed dataset: chunks of one bucket each.

    Chunk c is a list of `batch_size` dataset indices that share a bucket; epoch
    c // chunks_per_epoch covers every index at least once. Per epoch e, each bucket's
    members are shuffled and cut into pieces of batch_size; a short last piece is filled with
    other members of its bucket drawn at random (repeating members only when the bucket has
    fewer than batch_size); then all the epoch's pieces are shuffled. Every draw comes from
    (seed, e) and the bucket id alone, so ``chunk(c)`` does not depend on the calls before
    it: a resumed run sees the same batches.

    Raises ValueError for an empty `bucket_of` or a batch_size below 1.
    """

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int) -> None:
        if not bucket_of:
            raise ValueError("BucketBatches needs at least one example (bucket_of is empty).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            members.setdefault(bucket, []).append(index)
        self._members = dict(sorted(members.items()))  # bucket id -> its indices, ascending
        self.batch_size = batch_size
        self.seed = seed
        self._chunks_per_epoch = sum(
            math.ceil(len(indices) / batch_size) for indices in self._members.values()
        )
        self._cached: tuple[int, list[tuple[int, list[int]]]] | None = None

    @property
    def chunks_per_epoch(self) -> int:
        """Sum over buckets of ceil(bucket size / batch_size); the same every epoch."""
        return self._chunks_per_epoch

    def chunk(self, c: int) -> list[int]:
        """The dataset indices of global chunk number c."""
        return list(self._piece(c)[1])

    def bucket(self, c: int) -> int:
        """The bucket id of global chunk number c."""
        return self._piece(c)[0]

    def _piece(self, c: int) -> tuple[int, list[int]]:
        if c < 0:
            raise ValueError(f"chunk numbers start at 0, got {c}.")
        epoch, position = divmod(c, self._chunks_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = epoch, self._epoch_pieces(epoch)
        return self._cached[1][position]

    def _epoch_pieces(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(bucket id, indices) of each chunk of `epoch`, in schedule order."""
        size = self.batch_size
        pieces = []
        for bucket, indices in self._members.items():
            members = np.asarray(indices)
            rng = _seeded_rng(self.seed, epoch, bucket, stream=_MEMBERS_STREAM)
            shuffled = rng.permutation(members).tolist()
            for start in range(0, len(shuffled), size):
                pieces.append((bucket, shuffled[start : start + size]))
            last = pieces[-1][1]
            short = size - len(last)
            if short:
                rng = _seeded_rng(self.seed, epoch, bucket, stream=_FILL_STREAM)
                others = np.setdiff1d(members, last)  # ascending
                distinct = rng.permutation(others)[:short]
                repeated = rng.choice(members, short - len(distinct))  # when too few others
                last.extend(distinct.tolist() + repeated.tolist())
        order = _seeded_rng(self.seed, epoch, stream=_ORDER_STREAM).permutation(len(pieces))
        return [pieces[i] for i in order]
