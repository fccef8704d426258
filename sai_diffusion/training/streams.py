"""Every random stream of a training run, named by purpose and derived from the seed alone.

Nothing in training draws from a global or running generator: each draw comes from a stream
keyed by what it is for and by where it falls in the run, so a resumed run, a run split over N
processes, and (later) a run whose examples are prepared by N workers draw exactly what one
uninterrupted process draws. ``batches`` turns these streams into each example's draws; the
bucket schedule (``buckets``) and the held-out images (``held_out``) take theirs from here too.

    stream                     key                       draws
    epoch_order                (seed, epoch)             the order of the examples in an epoch
    example                    (seed, k)                 flip, the VAE posterior's sample, noise
                                                         (and its offset), timestep
    geometry                   (seed, epoch, index)      crop / rescale / placement of an image
    captions                   (seed, k, 1) / (seed, k, 2)   phrase shuffle and template / dropout
    bucket_order etc.          (seed, epoch[, bucket], stream)   BucketBatches' three draws
    class examples             the same, with seed + CLASS_STREAM
    validation noise           (index)                   fixed: the same in every run

k is the global example number (``batches``). The derivations are those the runs of earlier
versions used, so their figures stay reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

# the class examples' streams: the run's seed moved by this (another seed's would not collide)
CLASS_STREAM = 0x5EED_C1A5
# the held-out split and the validation noise: one fixed seed, not the run's, so every run of a
# concept is scored on the same images with the same noise
HELD_OUT_SEED = 20240308
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The order of the n examples in ``epoch``: a permutation of range(n)."""
    gen = torch.Generator().manual_seed((seed * 7919 + epoch) % (2**63 - 1))  # any seed
    return torch.randperm(n, generator=gen).tolist()


def example_generator(seed: int, k: int) -> torch.Generator:
    """The torch generator of global example k; its draws come in a fixed order
    (``batches.Batches.draws``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + k) * 131 % (2**63 - 1))


def seeded_rng(*values: int, stream: tuple[int, ...] = ()) -> np.random.Generator:
    """A numpy generator whose draws depend on ``values`` (ints, any sign) and ``stream`` alone.

    SeedSequence pads its entropy with zeros to four 32-bit words, so (a, b) and (a, b, 0)
    would give one stream: generators for different purposes pass different ``stream`` keys.
    """
    entropy = [value & _MASK64 for value in values]  # SeedSequence wants non-negative ints
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=stream))


def geometry_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The crop and placement draws of dataset image ``index`` in ``epoch``."""
    return seeded_rng(seed, epoch, index)


AUGMENT_CAPTION, DROP_CAPTION = 1, 2


def caption_rng(seed: int, k: int, purpose: int) -> np.random.Generator:
    """Example k's caption draws: ``AUGMENT_CAPTION`` (shuffle, template) or ``DROP_CAPTION``."""
    return np.random.default_rng(np.random.SeedSequence([seed & _MASK64, k, purpose]))


def validation_noise(index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(*shape) normal draws of held-out image ``index``; the same in every run."""
    gen = torch.Generator().manual_seed(HELD_OUT_SEED + 7919 * index)
    return torch.randn(shape, generator=gen)


def held_out_choice(n: int, count: int) -> set[int]:
    """The ``count`` of n sorted images held out for the validation loss, fixed per folder."""
    return set(np.random.default_rng(HELD_OUT_SEED).permutation(n)[:count].tolist())
