"""training.buckets: the bucket list, bucket assignment, bucket-sized crops (augment's
ConceptImages with sizes), and the BucketBatches schedule."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sai_diffusion.files.concept_data import Example, image_sizes
from sai_diffusion.training.augment import ConceptImages
from sai_diffusion.training.buckets import BucketBatches, assign_buckets, bucket_resolutions
from sai_diffusion.training.streams import geometry_rng

R, STEP = 32, 8  # the CPU miniature
RED, BLUE = (255, 0, 0), (0, 0, 255)
EPOCHS = 20


def save(path: Path, pixels: np.ndarray, **save_kwargs) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as an image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_kwargs)
    return path


def red_top_left(width: int, height: int) -> np.ndarray:
    """(H, W, 3) blue with its top 10 rows red over the left half: flips and crops move it."""
    pixels = np.full((height, width, 3), BLUE, dtype=np.uint8)
    pixels[:10, : width // 2] = RED
    return pixels


def is_red(item: dict) -> torch.Tensor:
    """(H, W) bool: where the item's pixels are red rather than blue."""
    pixel_values = item["pixel_values"]
    return pixel_values[0] > pixel_values[2]


def is_red_array(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool of an (H, W, 3) uint8 array: red rather than blue."""
    return pixels[..., 0] > pixels[..., 2]


def items(images: ConceptImages, index: int, seed: int = 0) -> list[dict]:
    """Image ``index`` in each of EPOCHS epochs (its geometry draws), every other one flipped."""
    return [images.load(index, geometry=geometry_rng(seed, epoch, index), flip=epoch % 2 == 1)
            for epoch in range(EPOCHS)]  # fmt: skip


# --------------------------------------------------------------------------- bucket list


@pytest.mark.parametrize("resolution, step", [(512, 64), (32, 8)])
def test_buckets_are_step_multiples_within_bounds_and_area(resolution, step):
    buckets = bucket_resolutions(resolution, step)
    low = math.ceil(resolution / 2 / step) * step
    high = 2 * resolution // step * step
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert low <= width <= high and low <= height <= high
        assert width * height <= resolution**2
    assert (resolution, resolution) in buckets
    assert all((height, width) in buckets for width, height in buckets)  # both orientations
    assert len(set(buckets)) == len(buckets)
    ratios = [width / height for width, height in buckets]
    assert ratios == sorted(ratios)


def test_known_buckets():
    sd = bucket_resolutions(512, 64)
    for bucket in [(512, 512), (384, 640), (640, 384), (448, 576), (256, 1024), (1024, 256)]:
        assert bucket in sd
    assert bucket_resolutions(32, 8) == [
        (16, 64), (16, 56), (16, 48), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16)
    ]  # fmt: skip


def test_each_bucket_or_its_transpose_is_the_tallest_for_its_width():
    # kohya's rule: the bucket found for a width cannot grow one step taller within the area
    # (or the largest side); its transpose comes along, so one of the two is such a bucket.
    def tallest(width: int, height: int) -> bool:
        return height == 1024 or width * (height + 64) > 512**2

    for width, height in bucket_resolutions(512, 64):
        assert tallest(width, height) or tallest(height, width)


@pytest.mark.parametrize("resolution, step", [(500, 64), (0, 8), (32, 0), (-32, 8)])
def test_bad_bucket_settings_raise(resolution, step):
    with pytest.raises(ValueError):
        bucket_resolutions(resolution, step)


# --------------------------------------------------------------------------- assignment


def test_portrait_landscape_and_square_find_their_buckets():
    buckets = bucket_resolutions(512, 64)
    portrait, landscape, square = assign_buckets([(400, 600), (600, 400), (300, 300)], buckets)
    # |log(2/3) - log(ratio)|: (384, 640) 0.105, (448, 576) 0.154, (320, 704) 0.383.
    assert buckets[portrait] == (384, 640)
    width, height = buckets[portrait]
    assert height > width and abs(width / height / (2 / 3) - 1) <= 0.1 + 1e-9
    assert buckets[landscape] == (height, width)
    assert buckets[square] == (512, 512)


def test_square_images_land_in_the_square_bucket_at_every_size():
    for resolution, step in [(512, 64), (32, 8), (768, 64)]:
        buckets = bucket_resolutions(resolution, step)
        for index in assign_buckets([(1, 1), (37, 37), (4000, 4000)], buckets):
            assert buckets[index] == (resolution, resolution)


def test_exact_ties_go_to_the_larger_area_then_the_lower_index():
    # A 2:3 image sits exactly between ratios 1/2 and 8/9 in log space ((2/3)**2 = 1/2 * 8/9);
    # float logs put 1/2 nearer by one ulp and would pick the smaller bucket.
    assert assign_buckets([(20, 30)], [(10, 20), (80, 90)]) == [1]
    assert assign_buckets([(20, 30)], [(80, 90), (10, 20)]) == [0]
    # Same areas: the lower index.
    assert assign_buckets([(5, 5)], [(20, 10), (10, 20)]) == [0]
    assert assign_buckets([(5, 5)], [(10, 20), (20, 10)]) == [0]


def test_image_sizes_reads_the_shown_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40x20, shown 20x40
    rotated = save(tmp_path / "a.jpg", np.zeros((20, 40, 3), np.uint8), exif=exif)
    plain = save(tmp_path / "b.png", np.zeros((30, 50, 3), np.uint8))
    sizes = image_sizes([Example(rotated, "c"), Example(plain, "c")])
    assert sizes == [(20, 40), (50, 30)]


# --------------------------------------------------------------------------- bucket crops


def test_bucket_item_keeps_the_whole_portrait_while_the_square_crops_its_top(tmp_path):
    # 48x80 has the (24, 40) bucket's ratio exactly, so the bucket item is the whole image.
    path = save(tmp_path / "portrait.png", red_top_left(48, 80))
    examples = [Example(path, "c")]
    buckets = bucket_resolutions(R, STEP)
    target = buckets[assign_buckets(image_sizes(examples), buckets)[0]]
    assert target == (24, 40)

    whole = Image.open(path).resize(target, resample=Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(whole, dtype=np.float32) / 127.5 - 1.0)
    expected = expected.permute(2, 0, 1)  # (3, 40, 24)
    bucketed = ConceptImages(examples, resolution=R, sizes=[target])
    for item in items(bucketed, 0):
        assert item["pixel_values"].shape == (3, 40, 24)
        assert item["mask"].shape == item["valid"].shape == (1, 40, 24)
        assert any(
            torch.allclose(item["pixel_values"], candidate, atol=1e-6)
            for candidate in (expected, expected.flip(-1))
        )
        assert is_red(item)[0].any()  # the red band is at the top every epoch
        assert torch.equal(item["valid"], torch.ones(1, 40, 24))

    square = ConceptImages(examples, resolution=R)
    assert any(not is_red(item).any() for item in items(square, 0))  # some crop loses it


def test_mask_and_valid_get_the_pixels_crop_and_flip(tmp_path):
    # 40x80 covers (24, 40) at 24x48, so the crop's top varies over [0, 8].
    pixels = red_top_left(40, 80)
    image = save(tmp_path / "image" / "a.png", pixels)
    mask = save(
        tmp_path / "mask" / "a.png", np.where(is_red_array(pixels), 255, 0).astype(np.uint8)
    )
    images = ConceptImages([Example(image, "c", mask)], resolution=R, sizes=[(24, 40)])

    red_rows, flipped = set(), set()
    for item in items(images, 0):
        red = is_red(item)
        assert torch.equal(item["mask"][0] > 0.5, red)
        assert torch.equal(item["valid"], torch.ones(1, 40, 24))
        red_rows.add(int(red.any(1).sum()))
        flipped.add(bool(red[:, -1].any()))
    assert len(red_rows) > 1  # the crop moved vertically
    assert flipped == {False, True}  # and both flips happened


@pytest.mark.parametrize("center_crop", [False, True])
def test_square_sizes_match_the_default_bitwise(tmp_path, center_crop):
    # Guards the square path: sizes of (R, R) must not change a single bit of any item.
    square = save(tmp_path / "image" / "a.png", red_top_left(50, 50))
    portrait = save(tmp_path / "image" / "b.png", red_top_left(40, 90))
    landscape = save(tmp_path / "image" / "c.png", red_top_left(70, 30))
    mask = save(tmp_path / "mask" / "c.png", np.full((30, 70), 200, np.uint8))
    examples = [Example(square, "c"), Example(portrait, "c"), Example(landscape, "c", mask)]
    kwargs = {"resolution": R, "center_crop": center_crop}
    default = ConceptImages(examples, **kwargs)
    squares = ConceptImages(examples, sizes=[(R, R)] * len(examples), **kwargs)
    for index in range(len(examples)):
        for expected, got in zip(items(default, index, 3), items(squares, index, 3), strict=True):
            for key in ("pixel_values", "mask", "valid"):
                assert torch.equal(got[key], expected[key]), (index, key)


def test_bucketed_items_of_a_chunk_stack(tmp_path):
    # End to end: sizes from the files, buckets assigned, one chunk's items stack.
    shapes = [(48, 80), (40, 90), (80, 48), (32, 32), (60, 60), (90, 40)]
    examples = [
        Example(save(tmp_path / f"{i}.png", red_top_left(*shape)), "c")
        for i, shape in enumerate(shapes)
    ]
    buckets = bucket_resolutions(R, STEP)
    bucket_of = assign_buckets(image_sizes(examples), buckets)
    images = ConceptImages(examples, resolution=R, sizes=[buckets[b] for b in bucket_of])
    batches = BucketBatches(bucket_of, batch_size=2, seed=0)
    for c in range(batches.chunks_per_epoch):
        width, height = buckets[batches.bucket(c)]
        batch = torch.stack([items(images, i)[c]["pixel_values"] for i in batches.chunk(c)])
        assert batch.shape == (2, 3, height, width)


def test_bad_sizes_raise(tmp_path):
    examples = [Example(save(tmp_path / "a.png", red_top_left(40, 80)), "c")]
    with pytest.raises(ValueError, match="augmentation crop"):
        ConceptImages(examples, resolution=R, augmentation="resize-crop-pad", sizes=[(24, 40)])
    with pytest.raises(ValueError, match="one \\(width, height\\) per example \\(1\\)"):
        ConceptImages(examples, resolution=R, sizes=[(24, 40), (32, 32)])


# --------------------------------------------------------------------------- schedule


def epoch_chunks(batches: BucketBatches, epoch: int) -> list[list[int]]:
    start = epoch * batches.chunks_per_epoch
    return [batches.chunk(c) for c in range(start, start + batches.chunks_per_epoch)]


def test_chunks_hold_one_bucket_and_cover_every_index():
    bucket_of = [0, 1, 0, 2, 1, 0, 0, 2, 2, 1, 0, 5]  # sizes 5, 3, 3 and 1
    batches = BucketBatches(bucket_of, batch_size=2, seed=7)
    assert batches.chunks_per_epoch == 3 + 2 + 2 + 1  # sum of ceil(n_b / 2)
    for epoch in range(4):
        seen = set()
        for c in range(epoch * batches.chunks_per_epoch, (epoch + 1) * batches.chunks_per_epoch):
            chunk = batches.chunk(c)
            assert len(chunk) == 2
            assert {bucket_of[i] for i in chunk} == {batches.bucket(c)}
            if batches.bucket(c) != 5:  # buckets of 2 or more fill without repeats
                assert len(set(chunk)) == 2
            seen.update(chunk)
        assert seen == set(range(len(bucket_of)))


def test_a_bucket_smaller_than_the_batch_repeats_its_members():
    batches = BucketBatches([0, 0, 0, 1], batch_size=3, seed=0)
    assert batches.chunks_per_epoch == 2
    for epoch in range(3):
        chunks = sorted(sorted(chunk) for chunk in epoch_chunks(batches, epoch))
        assert chunks == [[0, 1, 2], [3, 3, 3]]


def test_each_index_once_when_buckets_divide_by_the_batch():
    bucket_of = [2, 0, 1, 1, 0, 2, 2, 0, 2, 0, 2, 2]  # sizes 4, 2, 6
    batches = BucketBatches(bucket_of, batch_size=2, seed=1)
    assert batches.chunks_per_epoch == 6
    for epoch in range(3):
        counts = Counter(i for chunk in epoch_chunks(batches, epoch) for i in chunk)
        assert counts == Counter(range(len(bucket_of)))


def test_schedule_is_deterministic_and_independent_of_call_order():
    bucket_of = [i % 3 for i in range(20)]
    forward = BucketBatches(bucket_of, batch_size=3, seed=5)
    backward = BucketBatches(bucket_of, batch_size=3, seed=5)
    n = 3 * forward.chunks_per_epoch
    in_order = [forward.chunk(c) for c in range(n)]
    reversed_order = {c: backward.chunk(c) for c in reversed(range(n))}
    assert in_order == [reversed_order[c] for c in range(n)]
    assert [forward.bucket(c) for c in range(n)] == [backward.bucket(c) for c in range(n)]
    interleaved = [2 * forward.chunks_per_epoch, 0, n - 1, 1]  # jump between epochs
    assert [backward.chunk(c) for c in interleaved] == [in_order[c] for c in interleaved]


def test_seed_and_epoch_change_the_schedule():
    bucket_of = [i % 3 for i in range(30)]
    one = BucketBatches(bucket_of, batch_size=2, seed=0)
    other = BucketBatches(bucket_of, batch_size=2, seed=1)
    assert epoch_chunks(one, 0) != epoch_chunks(other, 0)
    assert epoch_chunks(one, 0) != epoch_chunks(one, 1)
    # The pieces of all buckets are shuffled together, not served bucket after bucket.
    orders = {
        tuple(
            one.bucket(c) for c in range(e * one.chunks_per_epoch, (e + 1) * one.chunks_per_epoch)
        )
        for e in range(3)
    }
    assert len(orders) > 1 and all(list(order) != sorted(order) for order in orders)


def test_bad_schedule_inputs_raise():
    with pytest.raises(ValueError):
        BucketBatches([], batch_size=2, seed=0)
    with pytest.raises(ValueError):
        BucketBatches([0, 1], batch_size=0, seed=0)
    with pytest.raises(ValueError):
        BucketBatches([0, 1], batch_size=1, seed=0).chunk(-1)
