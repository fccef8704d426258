"""A concept's images on disk: finding them, their captions and masks, and reading them.

Two folder layouts are accepted (README, docs/training.md):

    Mix-of-Show                      images with captions beside them
    data/image/a.png                 data/a.png
    data/caption/a.txt  (optional)   data/a.txt   (optional)
    data/mask/a.png     (optional)

Captions may say ``<TOK>`` where the concept's words go; an image without a caption gets the
caption template. Every image and mask is decoded once at discovery, so a broken file is
reported before training starts rather than hours into it. ``load_image`` / ``load_mask``
decode them again as training reads them (EXIF orientation applied, transparency on white,
16-bit greyscale rescaled).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
TOKEN_PLACEHOLDER = "<TOK>"

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
    check_mask_size(path, _oriented_size(mask), image_path, image_size)
    if _to_grey(mask).getextrema()[1] == 0:
        raise UserError(
            f"Mask {path} is entirely black, so the loss would ignore its image. Fix: paint "
            "the concept white in the mask, or delete the mask to train on the whole image."
        )


def check_mask_size(
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


# --------------------------------------------------------------------------- reading


def load_image(path: Path) -> Image.Image:
    """An image as shown (EXIF orientation applied), RGB, transparency composited on white.

    Raises:
        UserError: the file can no longer be read (deleted or damaged since discovery).
    """
    return _to_rgb(ImageOps.exif_transpose(_open_verified(path, kind="image")))


def load_mask(path: Path) -> Image.Image:
    """A mask as shown, 8-bit greyscale ("L"). Raises UserError like ``load_image``."""
    return _to_grey(ImageOps.exif_transpose(_open_verified(path, kind="mask")))


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


def image_sizes(examples: list[Example]) -> list[tuple[int, int]]:
    """Each example's image (width, height) as shown, EXIF orientation applied (header reads)."""
    sizes = []
    for example in examples:
        with Image.open(example.image_path) as image:
            sizes.append(_oriented_size(image))
    return sizes


# --------------------------------------------------------------------------- fingerprint


def data_fingerprint(examples: Sequence[Example], root: Path) -> dict[str, str]:
    """``{file: digest}`` of the concept's training data as a run starts: each image's and
    mask's bytes (sha256, 16 hex digits) by its path under ``root``, and each caption's text,
    by the image's path + ``#caption``. A resumed run compares it with the folder as it is
    now (``changed_data``)."""
    out = {}
    for example in examples:
        for path in (example.image_path, example.mask_path):
            if path is not None:
                out[_relative(path, root)] = _digest(Path(path).read_bytes())
        out[_relative(example.image_path, root) + "#caption"] = _digest(example.caption.encode())
    return out


def changed_data(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """What differs between two ``data_fingerprint``: "changed X", "added X", "removed X"."""
    changed = [f"changed {k}" for k in before if k in now and now[k] != before[k]]
    added = [f"added {k}" for k in now if k not in before]
    removed = [f"removed {k}" for k in before if k not in now]
    return changed + added + removed


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
