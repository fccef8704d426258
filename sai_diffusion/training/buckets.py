"""Aspect-ratio buckets (kohya's): each image trains at about its own shape rather than a square.

``bucket_resolutions`` lists (width, height) sizes of at most resolution**2 pixels,
``assign_buckets`` gives each image (``files.concept_data.image_sizes``) the bucket nearest its
aspect ratio, ``augment.ConceptImages(sizes=...)`` crops each image to its bucket's size, and
``BucketBatches`` schedules batches that hold one bucket each, so their tensors stack. The
schedule comes from (seed, epoch) alone (``streams``): a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..files.concept_data import Example, image_sizes
from .streams import seeded_rng

# Stream keys (see streams.seeded_rng) of BucketBatches' three generators.
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
            rng = seeded_rng(self.seed, epoch, bucket, stream=_MEMBERS_STREAM)
            shuffled = rng.permutation(members).tolist()
            for start in range(0, len(shuffled), size):
                pieces.append((bucket, shuffled[start : start + size]))
            last = pieces[-1][1]
            short = size - len(last)
            if short:
                rng = seeded_rng(self.seed, epoch, bucket, stream=_FILL_STREAM)
                others = np.setdiff1d(members, last)  # ascending
                distinct = rng.permutation(others)[:short]
                repeated = rng.choice(members, short - len(distinct))  # when too few others
                last.extend(distinct.tolist() + repeated.tolist())
        order = seeded_rng(self.seed, epoch, stream=_ORDER_STREAM).permutation(len(pieces))
        return [pieces[i] for i in order]


def bucket_sizes(examples: list[Example], resolution: int, step: int) -> list[tuple[int, int]]:
    """Each image's bucket (width, height): ``bucket_resolutions`` and ``assign_buckets``."""
    resolutions = bucket_resolutions(resolution, step)
    return [resolutions[b] for b in assign_buckets(image_sizes(examples), resolutions)]


def bucket_schedule(
    sizes: list[tuple[int, int]], batch_size: int, seed: int
) -> tuple[BucketBatches, str]:
    """The schedule of images of these bucket sizes, and a line saying which buckets they
    fill ("24x40: 2, 32x32: 3"), narrowest first."""
    order = sorted(set(sizes), key=lambda wh: wh[0] / wh[1])
    counts = ", ".join(f"{w}x{h}: {sizes.count((w, h))}" for w, h in order)
    return BucketBatches([order.index(s) for s in sizes], batch_size, seed), counts
