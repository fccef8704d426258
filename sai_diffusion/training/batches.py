"""Which examples each step trains on, and every random draw each of them needs.

The examples of a run are numbered: global example k = ((step * grad_accum + micro) * processes
+ rank) * batch_size + i. Example k is dataset image ``epoch_order(epoch)[k % n]`` of epoch
k // n (with buckets: the chunk's image, ``buckets.BucketBatches``), and everything random
about it comes from streams keyed by k or by its (epoch, image) (``streams``):

    flip, the VAE posterior's sample, the noise (and its offset), the timestep   example(seed, k)
    the crop / rescale / placement of its image                       geometry(seed, epoch, i)
    its caption's shuffle and template, its dropout                   captions(seed, k, 1 | 2)
    its class example (prior preservation): image and draws           the same, seed + CLASS_STREAM

So the global batch (batch_size x grad_accum x processes) sees the same examples with the same
draws however it is split: N processes with batch b train what one process with batch N*b
does, a resumed run continues as the uninterrupted one would have, and whoever turns an image
into tensors (``augment.ConceptImages``, with or without the latent cache) is handed its draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .augment import augment_caption
from .buckets import BucketBatches
from .streams import (
    AUGMENT_CAPTION,
    CLASS_STREAM,
    DROP_CAPTION,
    caption_rng,
    epoch_order,
    example_generator,
    geometry_rng,
)

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Draws:
    """Global example k: which image it trains on, and every random draw it needs."""

    k: int
    index: int  # the image, in its set (the concept's or the class images)
    epoch: int
    flip: bool
    posterior: torch.Tensor  # (C, h, w) N(0, 1): the sample taken from the VAE's posterior
    noise: torch.Tensor  # (C, h, w): the diffusion noise, its offset included
    timestep: int
    caption: str  # the prompt it trains with: augmented, or "" when dropped
    geometry_key: tuple[int, int, int]  # (seed, epoch, index) of its geometry stream

    def geometry(self) -> np.random.Generator:
        """A fresh generator of the image's crop and placement draws."""
        return geometry_rng(*self.geometry_key)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: the concept's examples, then (prior preservation) one class example per
    concept example, all of one size."""

    examples: list[Draws]
    prior_from: int  # examples[prior_from:] are class examples
    size: Size  # every example's (width, height): the square, or the chunk's bucket

    @property
    def concept(self) -> list[Draws]:
        return self.examples[: self.prior_from]

    @property
    def classes(self) -> list[Draws]:
        return self.examples[self.prior_from :]


@dataclass(frozen=True)
class CaptionDraws:
    """What a concept example's caption may go through (``config.settings.Captions``)."""

    shuffle: bool = False
    keep_tokens: int = 1
    templates: bool = False
    dropout: float = 0.0


class Batches:
    """The run's schedule: ``batch(step, micro)`` for this process, drawn from the seed alone.

    ``captions``: the concept images' captions; ``class_captions``: the class images' (prior
    preservation) or None; ``sizes``: each concept image's bucket, None for the square of
    ``resolution``; ``latent_shape(size)``: (C, h, w) of an image of that size.
    """

    def __init__(
        self,
        captions: Sequence[str],
        *,
        seed: int,
        batch_size: int,
        grad_accum: int,
        processes: int = 1,
        rank: int = 0,
        resolution: int,
        latent_shape: Callable[[Size], tuple[int, int, int]],
        num_timesteps: int,
        random_flip: float,
        noise_offset: float = 0.0,
        caption_draws: CaptionDraws = CaptionDraws(),
        sizes: Sequence[Size] | None = None,
        buckets: BucketBatches | None = None,
        class_captions: Sequence[str] | None = None,
    ) -> None:
        if (sizes is None) != (buckets is None):
            raise ValueError("sizes and buckets go together: each image's bucket, and the schedule")
        self.captions = list(captions)
        self.seed = seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.processes, self.rank = processes, rank
        self.resolution = resolution
        self.latent_shape = latent_shape
        self.num_timesteps = num_timesteps
        self.random_flip, self.noise_offset = random_flip, noise_offset
        self.caption_draws = caption_draws
        self.sizes, self.buckets = sizes, buckets
        self.class_captions = None if class_captions is None else list(class_captions)

    def example_numbers(self, step: int, micro: int) -> range:
        """The global example numbers k of (step, micro-batch) on this process."""
        chunk = self._chunk(step, micro)
        return range(chunk * self.batch_size, (chunk + 1) * self.batch_size)

    def _chunk(self, step: int, micro: int) -> int:
        return (step * self.grad_accum + micro) * self.processes + self.rank

    def batch(self, step: int, micro: int) -> Batch:
        """The examples of (step, micro-batch) on this process, with their draws."""
        ks = self.example_numbers(step, micro)
        n = len(self.captions)
        if self.buckets is not None:  # a chunk of one bucket, numbered like the micro-batches
            chunk = self._chunk(step, micro)
            indices = self.buckets.chunk(chunk)
            epochs = [chunk // self.buckets.chunks_per_epoch] * len(ks)
            size = self.sizes[indices[0]]
        else:
            epochs = [k // n for k in ks]
            indices = [epoch_order(self.seed, e, n)[k % n] for k, e in zip(ks, epochs, strict=True)]
            size = (self.resolution, self.resolution)
        shape = self.latent_shape(size)
        examples = [
            self._draws(self.seed, k, i, e, shape, self._caption(k, self.captions[i]))
            for k, i, e in zip(ks, indices, epochs, strict=True)
        ]
        prior_from = len(examples)
        if self.class_captions is not None:  # one class example per concept example
            m, seed = len(self.class_captions), self.seed + CLASS_STREAM
            for k in ks:
                epoch = k // m
                index = epoch_order(seed, epoch, m)[k % m]
                examples.append(self._draws(seed, k, index, epoch, shape,
                                            self.class_captions[index]))  # fmt: skip
        return Batch(examples, prior_from, size)

    def _draws(
        self, seed: int, k: int, index: int, epoch: int, shape: tuple[int, int, int], caption: str
    ) -> Draws:
        """Example k's draws from its generator, always in this order: flip, posterior sample,
        noise, noise offset (when on), timestep."""
        gen = example_generator(seed, k)
        flip = bool(torch.rand((), generator=gen) < self.random_flip)
        posterior = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((shape[0], 1, 1), generator=gen)
        timestep = int(torch.randint(0, self.num_timesteps, (1,), generator=gen))
        # the geometry stream is the run's seed for class images too (as earlier versions drew)
        return Draws(k, index, epoch, flip, posterior, noise, timestep, caption,
                     (self.seed, epoch, index))  # fmt: skip

    def _caption(self, k: int, caption: str) -> str:
        """A concept example's caption after its augmentation and dropout draws (each from its
        own stream, so turning one on leaves the other's draws as they were)."""
        c = self.caption_draws
        if c.shuffle or c.templates:
            caption = augment_caption(caption, caption_rng(self.seed, k, AUGMENT_CAPTION),
                                      shuffle=c.shuffle, keep_tokens=c.keep_tokens,
                                      templates=c.templates)  # fmt: skip
        if c.dropout > 0 and caption_rng(self.seed, k, DROP_CAPTION).random() < c.dropout:
            caption = ""
        return caption
