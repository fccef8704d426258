"""training.augment: a concept image as tensors given its draws ("crop", Mix-of-Show's
"resize-crop-pad", the mask and valid area with them) and caption shuffling and templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sai_diffusion.errors import UserError
from sai_diffusion.files.concept_data import Example, discover_examples
from sai_diffusion.training.augment import CAPTION_TEMPLATES, ConceptImages, augment_caption
from sai_diffusion.training.streams import geometry_rng

R = 32  # resolution
EPOCHS = 40
# No colour is near black, so after normalisation a pixel is exactly -1 only on the padding.
BODY = (230, 150, 70)  # orange: red > blue
TOP_BAND = (60, 90, 230)  # blue: blue > red
BOTTOM_BAND = (70, 220, 90)  # green: green > red and blue
PATCH = (150, 70, 210)  # violet, under the subject mask


def concept_folder(root: Path) -> Path:
    """A Mix-of-Show folder: a 40x100 portrait with blue top and green bottom rows, and a
    100x50 landscape with a masked violet patch. Short sides resize exactly: 32x80, 64x32."""
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    portrait = np.full((100, 40, 3), BODY, dtype=np.uint8)
    portrait[:10] = TOP_BAND
    portrait[90:] = BOTTOM_BAND
    Image.fromarray(portrait).save(root / "image" / "a_portrait.png")

    landscape = np.full((50, 100, 3), BODY, dtype=np.uint8)
    mask = np.zeros((50, 100), dtype=np.uint8)
    landscape[10:40, 40:60] = PATCH
    mask[10:40, 40:60] = 255
    Image.fromarray(landscape).save(root / "image" / "b_landscape.png")
    Image.fromarray(mask).save(root / "mask" / "b_landscape.png")
    return root


PORTRAIT, LANDSCAPE = 0, 1


@pytest.fixture
def examples(tmp_path):
    return discover_examples(concept_folder(tmp_path / "data"), token="<V>")


def fit(width: int, height: int) -> tuple[int, int]:
    """The pasted (height, width): torchvision's resize(R - 1, max_size=R), rounded."""
    scale = min((R - 1) / min(width, height), R / max(width, height))
    return round(height * scale), round(width * scale)


# Every (height, width) a crop can paste, and the one of the whole image.
PORTRAIT_CROPS = {fit(32, 32 + extra) for extra in range(80 - 32 + 1)}
PORTRAIT_WHOLE = fit(32, 80)  # (32, 13)
LANDSCAPE_CROP = fit(32, 32)  # (31, 31)
LANDSCAPE_WHOLE = fit(64, 32)  # (16, 32)


def pasted_box(item: dict) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the valid area, checked to be one filled rectangle."""
    valid = item["valid"][0]
    assert set(valid.unique().tolist()) <= {0.0, 1.0}
    rows = valid.any(1).nonzero().flatten()
    cols = valid.any(0).nonzero().flatten()
    top, left = rows[0].item(), cols[0].item()
    height, width = rows[-1].item() - top + 1, cols[-1].item() - left + 1
    assert valid.sum().item() == height * width
    assert valid[top : top + height, left : left + width].min() == 1.0
    return top, left, height, width


def load(images: ConceptImages, index: int, *, seed=0, epoch=0, flip=False) -> dict:
    """Image ``index`` with the geometry draws a run of ``seed`` takes for it in ``epoch``."""
    return images.load(index, geometry=geometry_rng(seed, epoch, index), flip=flip)


def items(examples, index: int, epochs=range(EPOCHS), *, seed=0, flips=False, **kwargs):
    """Image ``index`` over ``epochs`` with resize-crop-pad; ``flips``: every other one
    mirrored."""
    images = ConceptImages(examples, resolution=R, augmentation="resize-crop-pad", **kwargs)
    return [load(images, index, seed=seed, epoch=e, flip=flips and e % 2 == 1) for e in epochs]


def save_image(path: Path, size=(24, 16), color=(200, 100, 50), mode="RGB", **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def only_example(path: Path, mask_path: Path | None = None) -> list[Example]:
    return [Example(path, "a photo", mask_path)]


def first_item(examples, **kwargs) -> dict:
    return ConceptImages(examples, **kwargs).load(0, geometry=geometry_rng(0, 0, 0), flip=False)


# --------------------------------------------------------------------------- tensors


def test_items_have_documented_shapes_dtypes_and_ranges(tmp_path):
    half_black = np.zeros((40, 60, 3), dtype=np.uint8)
    half_black[:, 30:] = 255
    path = tmp_path / "bw.png"
    Image.fromarray(half_black).save(path)
    item = first_item([Example(path, "cap")], resolution=32, center_crop=True)

    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
    assert torch.equal(item["mask"], torch.ones(1, 32, 32))  # no mask: every pixel counts
    assert item["caption"] == "cap"
    pixels = item["pixel_values"]
    assert pixels.min() == -1.0 and pixels.max() == 1.0  # black and white hit the ends exactly
    assert pixels.is_contiguous()


def test_mask_values_are_in_unit_range(tmp_path):
    image = save_image(tmp_path / "a.png", size=(30, 30))
    grey = np.zeros((30, 30), dtype=np.uint8)
    grey[:, 10:20] = 128
    grey[:, 20:] = 255
    Image.fromarray(grey).save(tmp_path / "m.png")
    mask = first_item([Example(image, "c", tmp_path / "m.png")], resolution=30)["mask"]
    assert sorted(mask.unique().tolist()) == [0.0, pytest.approx(128 / 255), 1.0]
    # Resampled masks stay in range too.
    mask = first_item([Example(image, "c", tmp_path / "m.png")], resolution=17)["mask"]
    assert mask.min() >= 0.0 and mask.max() <= 1.0


def test_small_images_are_upscaled_to_the_resolution(tmp_path):
    image = save_image(tmp_path / "tiny.png", size=(8, 6))
    item = first_item(only_example(image), resolution=32)
    assert item["pixel_values"].shape == (3, 32, 32)


# --------------------------------------------------------------------------- augmentation


def marker_images(tmp_path, **kwargs) -> ConceptImages:
    """A 60x90 (portrait) image and mask with the same 12x12 marker on the left."""
    image = np.full((90, 60, 3), 128, dtype=np.uint8)
    mask = np.zeros((90, 60), dtype=np.uint8)
    image[30:42, 6:18] = (255, 0, 0)
    mask[30:42, 6:18] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    examples = [Example(tmp_path / "img.png", "c", tmp_path / "mask.png")] * 3
    return ConceptImages(examples, resolution=40, **kwargs)


def test_image_and_mask_get_the_same_crop_and_flip(tmp_path):
    images = marker_images(tmp_path)
    outcomes = set()
    for epoch in range(12):
        item = load(images, 0, seed=3, epoch=epoch, flip=epoch % 3 == 0)
        redness = ((item["pixel_values"][0] - item["pixel_values"][1]) / 2).clamp(min=0)
        mask = item["mask"][0]
        # Resized to 40x60, the marker spans rows 20..28: every crop (offset 0..20) keeps it.
        assert mask.sum() > 60
        assert torch.allclose(centroid(redness), centroid(mask), atol=0.5)
        outcomes.add((round(centroid(mask)[0].item()), centroid(mask)[1].item() > 20))
    flips = {flipped for _, flipped in outcomes}
    rows = {row for row, _ in outcomes}
    assert flips == {False, True}  # both flipped and unflipped outcomes were checked
    assert len(rows) > 3  # and several vertical crop offsets


def test_center_crop_without_flip_puts_the_marker_where_geometry_says(tmp_path):
    images = marker_images(tmp_path, center_crop=True)
    # 60x90 -> 40x60, the centre crop drops 10 rows at the top; the marker (rows 30..42,
    # cols 6..18, scaled by 2/3) lands on rows 10..18, cols 4..12 (give or take the blur).
    mask = load(images, 0)["mask"][0]
    assert mask[11:17, 5:11].min() > 0.99
    assert mask[:8].max() < 0.01 and mask[20:].max() < 0.01 and mask[:, 14:].max() < 0.01


def test_a_flip_mirrors_the_unflipped_crop(tmp_path):
    images = marker_images(tmp_path)
    plain, mirrored = (load(images, 1, seed=7, epoch=2, flip=f) for f in (False, True))
    for key in ("pixel_values", "mask"):
        assert torch.equal(mirrored[key], plain[key].flip(-1))


def test_the_same_draws_give_the_same_tensors_whatever_came_before(tmp_path):
    """A pure transform: a fresh object, the global RNG disturbed, the images read in another
    order give the same crops; the index, epoch and seed keys each draw their own."""
    first = marker_images(tmp_path)
    expected = [load(first, i, seed=11, epoch=4)["pixel_values"] for i in range(3)]
    torch.manual_seed(123)
    np.random.seed(123)
    second = marker_images(tmp_path)
    for i in (2, 0, 1):
        assert torch.equal(load(second, i, seed=11, epoch=4)["pixel_values"], expected[i])

    def crops(seed, epoch) -> list[torch.Tensor]:
        return [load(first, i, seed=seed, epoch=epoch)["pixel_values"] for i in range(3)]

    def all_equal(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(tensors, others, strict=True))

    assert not all_equal(expected, expected[:1] * 3)  # index matters (the same image at each)
    assert not all_equal(expected, crops(11, 5))  # epoch matters
    assert not all_equal(expected, crops(12, 4))  # seed matters


def test_image_deleted_after_discovery_is_named(tmp_path):
    image = save_image(tmp_path / "a.png")
    images = ConceptImages(only_example(image), resolution=8)
    image.unlink()
    with pytest.raises(UserError, match="a.png"):
        load(images, 0)


# --------------------------------------------------------------------------- crop


def test_crop_is_the_default_and_unchanged_with_valid_all_ones(examples):
    """Naming "crop" (and a crop_p it ignores) gives exactly what the default gives."""
    for kwargs in ({}, {"center_crop": True}):
        default = ConceptImages(examples, resolution=R, **kwargs)
        named = ConceptImages(examples, resolution=R, augmentation="crop", crop_p=0.9, **kwargs)
        for epoch, flip in ((0, False), (1, True), (5, False)):
            for index in (PORTRAIT, LANDSCAPE):
                expected = load(default, index, seed=9, epoch=epoch, flip=flip)
                item = load(named, index, seed=9, epoch=epoch, flip=flip)
                assert torch.equal(item["pixel_values"], expected["pixel_values"])
                assert torch.equal(item["mask"], expected["mask"])
                assert torch.equal(item["valid"], torch.ones(1, R, R))
                assert torch.equal(expected["valid"], torch.ones(1, R, R))


def test_crop_matches_a_reference_of_the_original_algorithm(examples):
    """Guards the "crop" draws: shorter side to R (bicubic), then the geometry stream's top and
    left; the flip is the example's own draw (``batches``), applied last."""
    images = ConceptImages(examples, resolution=R)
    for epoch in range(6):
        for index, example in enumerate(examples):
            with Image.open(example.image_path) as image:
                image = image.convert("RGB")
                scale = R / min(image.size)
                image = image.resize(
                    (round(image.width * scale), round(image.height * scale)),
                    resample=Image.Resampling.BICUBIC,
                )
            rng = geometry_rng(4, epoch, index)
            top = int(rng.integers(0, image.height - R + 1))
            left = int(rng.integers(0, image.width - R + 1))
            flip = epoch % 2 == 1
            pixels = np.asarray(image, dtype=np.float32)[top : top + R, left : left + R]
            expected = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)
            if flip:
                expected = expected.flip(-1)
            got = load(images, index, seed=4, epoch=epoch, flip=flip)["pixel_values"]
            assert torch.equal(got, expected)


# --------------------------------------------------------------------------- resize-crop-pad


@pytest.mark.parametrize("index", [PORTRAIT, LANDSCAPE])
def test_valid_is_exactly_the_non_black_pasted_rectangle(examples, index):
    for item in items(examples, index, flips=True):
        pasted_box(item)
        shown = (item["pixel_values"] != -1.0).any(0)
        assert torch.equal(shown, item["valid"][0] > 0)
        assert item["valid"].shape == item["mask"].shape == (1, R, R)
        assert item["valid"].dtype == torch.float32


def test_pasted_sizes_follow_the_fit_formula_and_both_branches_occur(examples):
    portrait = [pasted_box(item)[2:] for item in items(examples, PORTRAIT, crop_p=0.5)]
    landscape = [pasted_box(item)[2:] for item in items(examples, LANDSCAPE, crop_p=0.5)]
    assert set(portrait) <= PORTRAIT_CROPS | {PORTRAIT_WHOLE}
    assert set(landscape) == {LANDSCAPE_CROP, LANDSCAPE_WHOLE}  # both branches, nothing else
    assert PORTRAIT_WHOLE in portrait and len(set(portrait)) > 3  # whole, and several crops
    assert LANDSCAPE_CROP == (R - 1, R - 1)  # a square is pasted (R - 1) x (R - 1)


def test_crop_p_zero_never_crops_and_one_always_crops(examples):
    for item in items(examples, PORTRAIT, crop_p=0.0):
        assert pasted_box(item)[2:] == PORTRAIT_WHOLE
    for item in items(examples, LANDSCAPE, crop_p=0.0):
        assert pasted_box(item)[2:] == LANDSCAPE_WHOLE
    for item in items(examples, LANDSCAPE, crop_p=1.0):
        assert pasted_box(item)[2:] == LANDSCAPE_CROP
    portrait_sizes = [pasted_box(item)[2:] for item in items(examples, PORTRAIT, crop_p=1.0)]
    assert set(portrait_sizes) <= PORTRAIT_CROPS
    assert len(set(portrait_sizes)) > 5  # the kept height is drawn, not fixed


def test_portrait_crop_keeps_the_top_rows(examples):
    """The blue top rows are the first pasted row, cropped or not; the green bottom rows
    (72.. of the 80 resized) show when the image is whole and are gone from short crops."""
    for item in items(examples, PORTRAIT, crop_p=1.0) + items(examples, PORTRAIT, crop_p=0.0):
        top, left, height, width = pasted_box(item)
        red, green, blue = item["pixel_values"][:, top : top + height, left : left + width]
        assert (blue[0] > red[0] + 0.5).all()  # the bands span the width: flips cannot hide them
        if (height, width) == PORTRAIT_WHOLE:
            assert (green[-1] > red[-1] + 0.5).all()
        elif width >= 15:  # pasted width round(32 * 32 / kept): at most 70 rows kept, all above
            assert (red[-1] > blue[-1] + 0.5).all()
            assert not (green > red + 0.5).any()


def centroid(weights: torch.Tensor) -> torch.Tensor:
    """(row, column) of a (H, W) weight map."""
    rows = torch.arange(weights.shape[0], dtype=torch.float32)
    cols = torch.arange(weights.shape[1], dtype=torch.float32)
    total = weights.sum()
    return torch.stack([(weights.sum(1) * rows).sum(), (weights.sum(0) * cols).sum()]) / total


def test_landscape_crop_moves_image_and_mask_together(examples):
    patch_columns = set()
    for item in items(examples, LANDSCAPE, crop_p=1.0, flips=True):
        _, left, _, _ = pasted_box(item)
        red, _, blue = item["pixel_values"]
        violet = (blue > red + 0.2).float()  # the patch; the rest of the image is orange
        masked = (item["mask"][0] > 0.5).float()
        assert violet.sum() > 20 and masked.sum() > 20  # every 32-wide crop keeps some patch
        assert torch.allclose(centroid(violet), centroid(masked), atol=1.0)
        patch_columns.add(round(centroid(masked)[1].item()) - left)
    assert len(patch_columns) > 3  # the crop's left offset is drawn


@pytest.mark.parametrize("index", [PORTRAIT, LANDSCAPE])
def test_subject_mask_is_zero_outside_the_pasted_area(examples, index):
    for item in items(examples, index, flips=True):
        mask, valid = item["mask"][0], item["valid"][0]
        assert mask[valid == 0].abs().max() == 0.0
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        if index == PORTRAIT:  # no mask file: the subject is the whole pasted image
            assert torch.equal(mask, valid)


def test_flip_mirrors_pixels_mask_and_valid_and_keeps_the_placement(examples):
    images = ConceptImages(examples, resolution=R, augmentation="resize-crop-pad")
    for epoch in (0, 3, 8):
        for index in (PORTRAIT, LANDSCAPE):
            plain = load(images, index, epoch=epoch)
            mirrored = load(images, index, epoch=epoch, flip=True)
            for key in ("pixel_values", "mask", "valid"):
                assert torch.equal(mirrored[key], plain[key].flip(-1))


def test_placement_depends_only_on_its_draws(examples):
    """The same geometry stream gives the same tensors (the transform keeps no state);
    another epoch or seed another placement."""

    def run(seed: int) -> list[dict]:
        return items(examples, LANDSCAPE, epochs=range(8), seed=seed, flips=True)

    first, again = run(3), run(3)
    for a, b in zip(first, again, strict=True):
        for key in ("pixel_values", "mask", "valid"):
            assert torch.equal(a[key], b[key])
    boxes = {pasted_box(item) for item in first}
    assert len(boxes) > 2  # epochs draw different crops and placements
    assert [pasted_box(item) for item in run(4)] != [pasted_box(item) for item in first]


def test_settings_are_validated_by_name(examples):
    """The config refuses users' bad values (tests/config); the transform refuses a caller's."""
    with pytest.raises(ValueError, match="augmentation"):
        ConceptImages(examples, resolution=R, augmentation="pad")
    for crop_p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="crop_p"):
            ConceptImages(examples, resolution=R, augmentation="resize-crop-pad", crop_p=crop_p)
    with pytest.raises(ValueError, match="resolution"):
        ConceptImages(examples, resolution=0)
    with pytest.raises(ValueError, match="at least one example"):
        ConceptImages([], resolution=8)


def test_center_crop_is_ignored_by_resize_crop_pad(examples):
    kwargs = {"resolution": R, "augmentation": "resize-crop-pad"}
    centred = ConceptImages(examples, center_crop=True, **kwargs)
    plain = ConceptImages(examples, **kwargs)
    for index in (PORTRAIT, LANDSCAPE):
        a, b = load(centred, index, seed=2), load(plain, index, seed=2)
        assert torch.equal(a["pixel_values"], b["pixel_values"])


# --------------------------------------------------------------------------- captions

CAPTION = "<V>, man, red hat, blue coat, standing, on a bench, smiling"
PHRASES = CAPTION.split(", ")


def shuffled(caption: str, seed: int, keep_tokens: int = 1) -> str:
    rng = np.random.default_rng(seed)
    return augment_caption(caption, rng, shuffle=True, keep_tokens=keep_tokens, templates=False)


@pytest.mark.parametrize("keep_tokens", [0, 1, 2])
def test_shuffle_keeps_the_leading_phrases_and_the_multiset(keep_tokens):
    outputs = {shuffled(CAPTION, seed, keep_tokens) for seed in range(20)}
    for output in outputs:
        phrases = output.split(", ")
        assert phrases[:keep_tokens] == PHRASES[:keep_tokens]
        assert sorted(phrases) == sorted(PHRASES)
    assert len(outputs) > 5  # it does shuffle


def test_shuffle_strips_phrases_and_drops_empty_ones():
    output = shuffled(" <V> ,, red hat ,  , blue coat,", seed=0)
    assert output.split(", ")[0] == "<V>"
    assert sorted(output.split(", ")) == ["<V>", "blue coat", "red hat"]


def test_keep_tokens_beyond_the_phrases_keeps_the_order():
    assert shuffled("<V>, man", seed=0, keep_tokens=5) == "<V>, man"


def test_templates_hold_the_caption_once_and_are_all_used():
    assert len(CAPTION_TEMPLATES) >= 12
    assert all(template.count("{}") == 1 for template in CAPTION_TEMPLATES)
    caption = "<V> with {braces} and {}"  # braces in a caption survive
    chosen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        output = augment_caption(caption, rng, shuffle=False, keep_tokens=1, templates=True)
        assert output.count(caption) == 1
        matches = [t for t in CAPTION_TEMPLATES if t.replace("{}", caption) == output]
        assert len(matches) == 1
        chosen.add(matches[0])
    assert chosen == set(CAPTION_TEMPLATES)  # drawn uniformly: 200 draws reach all of them


def test_both_off_is_the_identity_and_draws_nothing():
    rng = np.random.default_rng(0)
    caption = " odd ,, spacing "
    assert augment_caption(caption, rng, shuffle=False, keep_tokens=1, templates=False) == caption
    assert rng.random() == np.random.default_rng(0).random()


def test_same_seed_same_caption_and_the_permutation_is_drawn_first():
    def both(seed: int) -> str:
        rng = np.random.default_rng(seed)
        return augment_caption(CAPTION, rng, shuffle=True, keep_tokens=1, templates=True)

    for seed in range(10):
        assert both(seed) == both(seed)
        rng = np.random.default_rng(seed)
        phrases = PHRASES[1:]
        expected_caption = ", ".join(PHRASES[:1] + [phrases[i] for i in rng.permutation(6)])
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        assert expected_caption == shuffled(CAPTION, seed)
        assert both(seed) == template.replace("{}", expected_caption)


def test_negative_keep_tokens_is_refused():
    with pytest.raises(ValueError, match="keep_tokens"):
        rng = np.random.default_rng(0)
        augment_caption(CAPTION, rng, shuffle=True, keep_tokens=-1, templates=False)
