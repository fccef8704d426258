"""training.data augmentations: "crop" kept as it was, Mix-of-Show's "resize-crop-pad", and
caption shuffling and templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sai_diffusion.errors import UserError
from sai_diffusion.training.data import (
    CAPTION_TEMPLATES,
    ConceptDataset,
    augment_caption,
    discover_examples,
)

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


def items(examples, index: int, epochs=range(EPOCHS), **kwargs) -> list[dict]:
    kwargs.setdefault("random_flip", 0.0)
    dataset = ConceptDataset(examples, resolution=R, augmentation="resize-crop-pad", **kwargs)
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.append(dataset[index])
    return out


# --------------------------------------------------------------------------- crop


def test_crop_is_the_default_and_unchanged_with_valid_all_ones(examples):
    """Naming "crop" (and a crop_p it ignores) draws exactly what the default dataset draws."""
    for kwargs in ({}, {"center_crop": True}, {"random_flip": 0.7, "seed": 9}):
        default = ConceptDataset(examples, resolution=R, **kwargs)
        named = ConceptDataset(examples, resolution=R, augmentation="crop", crop_p=0.9, **kwargs)
        for epoch in (0, 1, 5):
            default.set_epoch(epoch)
            named.set_epoch(epoch)
            for index in (PORTRAIT, LANDSCAPE):
                expected, item = default[index], named[index]
                assert torch.equal(item["pixel_values"], expected["pixel_values"])
                assert torch.equal(item["mask"], expected["mask"])
                assert torch.equal(item["valid"], torch.ones(1, R, R))
                assert torch.equal(expected["valid"], torch.ones(1, R, R))


def test_crop_matches_a_reference_of_the_original_algorithm(examples):
    """Guards the "crop" stream: shorter side to R (bicubic), then the draws top, left, flip."""
    dataset = ConceptDataset(examples, resolution=R, random_flip=0.5, seed=4)
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index, example in enumerate(examples):
            with Image.open(example.image_path) as image:
                image = image.convert("RGB")
                scale = R / min(image.size)
                image = image.resize(
                    (round(image.width * scale), round(image.height * scale)),
                    resample=Image.Resampling.BICUBIC,
                )
            rng = dataset.augmentation_rng(index)
            top = int(rng.integers(0, image.height - R + 1))
            left = int(rng.integers(0, image.width - R + 1))
            flip = bool(rng.random() < 0.5)
            pixels = np.asarray(image, dtype=np.float32)[top : top + R, left : left + R]
            expected = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)
            if flip:
                expected = expected.flip(-1)
            assert torch.equal(dataset[index]["pixel_values"], expected)


# --------------------------------------------------------------------------- resize-crop-pad


@pytest.mark.parametrize("index", [PORTRAIT, LANDSCAPE])
def test_valid_is_exactly_the_non_black_pasted_rectangle(examples, index):
    for item in items(examples, index, random_flip=0.5):
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
    for item in items(examples, LANDSCAPE, crop_p=1.0, random_flip=0.5):
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
    for item in items(examples, index, random_flip=0.5):
        mask, valid = item["mask"][0], item["valid"][0]
        assert mask[valid == 0].abs().max() == 0.0
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        if index == PORTRAIT:  # no mask file: the subject is the whole pasted image
            assert torch.equal(mask, valid)


def test_flip_mirrors_pixels_mask_and_valid_and_keeps_the_placement(examples):
    plain = ConceptDataset(examples, resolution=R, augmentation="resize-crop-pad", random_flip=0.0)
    mirrored = ConceptDataset(
        examples, resolution=R, augmentation="resize-crop-pad", random_flip=1.0
    )
    for epoch in (0, 3, 8):
        plain.set_epoch(epoch)
        mirrored.set_epoch(epoch)
        for index in (PORTRAIT, LANDSCAPE):
            for key in ("pixel_values", "mask", "valid"):
                assert torch.equal(mirrored[index][key], plain[index][key].flip(-1))


def test_placement_depends_only_on_seed_epoch_and_index(examples):
    def run(seed: int) -> list[dict]:
        return items(examples, LANDSCAPE, epochs=range(8), seed=seed, random_flip=0.5)

    first, again = run(3), run(3)
    for a, b in zip(first, again, strict=True):
        for key in ("pixel_values", "mask", "valid"):
            assert torch.equal(a[key], b[key])
    boxes = {pasted_box(item) for item in first}
    assert len(boxes) > 2  # epochs draw different crops and placements
    assert [pasted_box(item) for item in run(4)] != [pasted_box(item) for item in first]


def test_settings_are_validated_by_name(examples):
    with pytest.raises(UserError, match="augmentation"):
        ConceptDataset(examples, resolution=R, augmentation="pad")
    for crop_p in (-0.1, 1.5):
        with pytest.raises(UserError, match="crop_p"):
            ConceptDataset(examples, resolution=R, augmentation="resize-crop-pad", crop_p=crop_p)


def test_center_crop_is_ignored_by_resize_crop_pad(examples):
    kwargs = {"resolution": R, "augmentation": "resize-crop-pad", "seed": 2}
    centred = ConceptDataset(examples, center_crop=True, **kwargs)
    plain = ConceptDataset(examples, **kwargs)
    for index in (PORTRAIT, LANDSCAPE):
        assert torch.equal(centred[index]["pixel_values"], plain[index]["pixel_values"])


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
    with pytest.raises(UserError, match="keep_tokens"):
        rng = np.random.default_rng(0)
        augment_caption(CAPTION, rng, shuffle=True, keep_tokens=-1, templates=False)
