"""files.concept_data: finding a concept's images, captions and masks in either layout, the
error messages of every way a folder can be wrong, and reading the images back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sai_diffusion.errors import UserError
from sai_diffusion.files.concept_data import Example, discover_examples, load_image

TOKEN = "<Vpotter>"


def save_image(path: Path, size=(24, 16), color=(200, 100, 50), mode="RGB", **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- layouts


def test_mix_of_show_layout_pairs_captions_and_masks_by_basename(tmp_path):
    save_image(tmp_path / "image" / "b.jpg")
    save_image(tmp_path / "image" / "a.png")
    save_image(tmp_path / "image" / "c.PNG")
    write_text(tmp_path / "caption" / "a.txt", "<TOK>, holding wand, wand\n")
    write_text(tmp_path / "caption" / "b.txt", "portrait of <TOK> in <TOK> style")
    save_image(tmp_path / "mask" / "a.png", mode="1", color=1)

    examples = discover_examples(tmp_path, token=TOKEN)

    assert examples == [
        Example(
            tmp_path / "image" / "a.png",
            "<Vpotter>, holding wand, wand",
            tmp_path / "mask" / "a.png",
        ),
        Example(tmp_path / "image" / "b.jpg", "portrait of <Vpotter> in <Vpotter> style", None),
        Example(tmp_path / "image" / "c.PNG", "a photo of <Vpotter>", None),
    ]


def test_mix_of_show_caption_and_mask_folders_are_optional(tmp_path):
    save_image(tmp_path / "image" / "only.webp")
    examples = discover_examples(tmp_path, token=TOKEN, caption_template="{token} man")
    assert examples == [Example(tmp_path / "image" / "only.webp", "<Vpotter> man", None)]


def test_flat_layout_reads_captions_beside_images_and_skips_other_files(tmp_path):
    save_image(tmp_path / "2.JPEG")
    save_image(tmp_path / "1.bmp")
    save_image(tmp_path / "3.Jpg")
    write_text(tmp_path / "2.txt", "  <TOK>\n  on a bench  ")
    write_text(tmp_path / ".DS_Store", "junk")  # hidden: ignored
    write_text(tmp_path / "notes.md", "not a caption")  # unknown extension: ignored
    save_image(tmp_path / "drafts" / "x.png")  # subfolders are not searched

    examples = discover_examples(tmp_path, token=TOKEN, caption_template="a photo of {token}")

    assert [e.image_path.name for e in examples] == ["1.bmp", "2.JPEG", "3.Jpg"]
    assert [e.caption for e in examples] == [
        "a photo of <Vpotter>",
        "<Vpotter> on a bench",  # whitespace and newlines collapsed
        "a photo of <Vpotter>",
    ]
    assert all(e.mask_path is None for e in examples)


def test_discovery_order_is_sorted_whatever_the_creation_order(tmp_path):
    for name in ["z.png", "m.png", "a.png", "b.png"]:
        save_image(tmp_path / name)
    names = [e.image_path.name for e in discover_examples(tmp_path, token=TOKEN)]
    assert names == ["a.png", "b.png", "m.png", "z.png"]


def test_template_may_use_the_placeholder_too(tmp_path):
    save_image(tmp_path / "a.png")
    [example] = discover_examples(tmp_path, token=TOKEN, caption_template="photo of <TOK>")
    assert example.caption == "photo of <Vpotter>"


# --------------------------------------------------------------------------- errors


def raises_naming(path_or_text, func, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert str(path_or_text) in message
    return message


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nope"
    message = raises_naming(missing, discover_examples, missing, token=TOKEN)
    assert "does not exist" in message


def test_file_instead_of_folder_is_named(tmp_path):
    file = write_text(tmp_path / "data.txt", "x")
    raises_naming(file, discover_examples, file, token=TOKEN)


@pytest.mark.parametrize("setup", ["empty", "no_images", "subfolders_only", "empty_image_dir"])
def test_folder_without_images_lists_extensions_and_layouts(tmp_path, setup):
    if setup == "no_images":
        write_text(tmp_path / "readme.md", "hello")
        save_image(tmp_path / "pic.gif", mode="P", color=0)
    elif setup == "subfolders_only":
        save_image(tmp_path / "photos" / "a.png")
    elif setup == "empty_image_dir":
        (tmp_path / "image").mkdir()
    message = raises_naming(tmp_path, discover_examples, tmp_path, token=TOKEN)
    for extension in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        assert extension in message
    assert "Mix-of-Show" in message and "caption/" in message and ".txt" in message
    if setup == "subfolders_only":
        assert "photos" in message


def test_caption_without_image_is_named_flat(tmp_path):
    save_image(tmp_path / "a.png")
    orphan = write_text(tmp_path / "b.txt", "<TOK>")
    raises_naming(orphan, discover_examples, tmp_path, token=TOKEN)


def test_caption_without_image_is_named_mix_of_show(tmp_path):
    save_image(tmp_path / "image" / "a.png")
    orphan = write_text(tmp_path / "caption" / "typo.txt", "<TOK>")
    raises_naming(orphan, discover_examples, tmp_path, token=TOKEN)


def test_mask_without_image_is_named(tmp_path):
    save_image(tmp_path / "image" / "a.png")
    orphan = save_image(tmp_path / "mask" / "b.png", mode="L", color=255)
    raises_naming(orphan, discover_examples, tmp_path, token=TOKEN)


def test_caption_inside_image_folder_is_named(tmp_path):
    save_image(tmp_path / "image" / "a.png")
    stray = write_text(tmp_path / "image" / "a.txt", "<TOK>")
    message = raises_naming(stray, discover_examples, tmp_path, token=TOKEN)
    assert str(tmp_path / "caption" / "a.txt") in message


def test_caption_folder_without_image_folder_is_refused(tmp_path):
    save_image(tmp_path / "a.png")
    write_text(tmp_path / "caption" / "a.txt", "<TOK>")
    raises_naming(tmp_path / "image", discover_examples, tmp_path, token=TOKEN)


def test_corrupt_image_is_named(tmp_path):
    save_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png at all")
    raises_naming(bad, discover_examples, tmp_path, token=TOKEN)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_image_is_named(tmp_path, name):
    # The header is intact, so Image.open succeeds; only decoding the pixels fails.
    rng = np.random.default_rng(0)
    full = tmp_path / f"full_{name}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    bad = tmp_path / "data" / name
    bad.parent.mkdir()
    data = full.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    raises_naming(bad, discover_examples, bad.parent, token=TOKEN)


def test_corrupt_mask_is_named(tmp_path):
    save_image(tmp_path / "image" / "a.png")
    bad = tmp_path / "mask" / "a.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    raises_naming(bad, discover_examples, tmp_path, token=TOKEN)


@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_empty_caption_is_named_with_both_fixes(tmp_path, text):
    save_image(tmp_path / "a.png")
    empty = write_text(tmp_path / "a.txt", text)
    message = raises_naming(empty, discover_examples, tmp_path, token=TOKEN)
    assert "write a caption" in message and "delete" in message


def test_non_utf8_caption_is_named(tmp_path):
    save_image(tmp_path / "a.png")
    bad = tmp_path / "a.txt"
    bad.write_bytes(b"caf\xe9 <TOK>")
    raises_naming(bad, discover_examples, tmp_path, token=TOKEN)


def test_two_images_with_one_basename_are_named(tmp_path):
    first = save_image(tmp_path / "a.jpg")
    second = save_image(tmp_path / "a.png")
    message = raises_naming(first, discover_examples, tmp_path, token=TOKEN)
    assert str(second) in message


def test_mask_of_another_size_is_named(tmp_path):
    save_image(tmp_path / "image" / "a.png", size=(24, 16))
    wrong = save_image(tmp_path / "mask" / "a.png", size=(12, 8), mode="L", color=255)
    message = raises_naming(wrong, discover_examples, tmp_path, token=TOKEN)
    assert "12x8" in message and "24x16" in message


def test_all_black_mask_is_named(tmp_path):
    save_image(tmp_path / "image" / "a.png")
    black = save_image(tmp_path / "mask" / "a.png", mode="L", color=0)
    raises_naming(black, discover_examples, tmp_path, token=TOKEN)


def test_bad_caption_template_is_refused(tmp_path):
    save_image(tmp_path / "a.png")
    raises_naming(
        "{class_word}", discover_examples, tmp_path, token=TOKEN, caption_template="a {class_word}"
    )


# --------------------------------------------------------------------------- reading


def test_rgba_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black...
    rgba[:, :8] = (255, 0, 0, 255)  # ...except an opaque red left half
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    pixels = np.asarray(load_image(path))  # (H, W, 3) uint8
    assert (pixels[:, 8:] == 255).all()  # transparent -> white
    assert (pixels[:, :8] == (255, 0, 0)).all()


def test_palette_transparency_is_composited_on_white(tmp_path):
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, 1 blue
    palette_image.paste(1, (0, 0, 8, 16))
    path = tmp_path / "pal.png"
    palette_image.save(path, transparency=0)
    pixels = np.asarray(load_image(path))
    assert (pixels[:, 8:] == 255).all()
    assert (pixels[0, 0] == (0, 0, 255)).all()


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_greyscale_becomes_three_equal_channels(tmp_path, mode):
    grey = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    image = Image.fromarray(grey, mode="L")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "1":
        image = image.convert("1", dither=Image.Dither.NONE)
    path = tmp_path / f"grey_{mode}.png"
    image.save(path)
    pixels = np.asarray(load_image(path))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() == 255


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    values = np.full((16, 16), 32768, dtype=np.uint16)  # mid grey in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    pixels = np.asarray(load_image(path)).astype(int)
    assert (abs(pixels - 128) <= 1).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, left half red and right half blue; orientation 6 says "rotate 90
    # degrees clockwise to display", which puts red on top and blue at the bottom.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (40, 20, 3)  # shown portrait
    assert (pixels[:20] == (255, 0, 0)).all() and (pixels[20:] == (0, 0, 255)).all()


def test_exif_orientation_is_applied_before_the_mask_size_check(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    save_image(tmp_path / "image" / "a.jpg", size=(30, 20), exif=exif)  # shown as 20x30
    save_image(tmp_path / "mask" / "a.png", size=(20, 30), mode="L", color=255)
    [example] = discover_examples(tmp_path, token=TOKEN)
    assert example.mask_path == tmp_path / "mask" / "a.png"
