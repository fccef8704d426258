"""training.batches: which examples each step trains on and every draw they need, from the seed
and the example's number alone (no model: the schedule is pure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sai_diffusion.training.batches import Batches, CaptionDraws
from sai_diffusion.training.buckets import BucketBatches

CAPTIONS = [f"<V>, image {i}, red, on grass" for i in range(5)]


def batches(**kwargs) -> Batches:
    settings = {"seed": 3, "batch_size": 4, "grad_accum": 1, "resolution": 32,
                "latent_shape": lambda size: (4, size[1] // 8, size[0] // 8),
                "num_timesteps": 1000, "random_flip": 0.5} | kwargs  # fmt: skip
    return Batches(CAPTIONS, **settings)


def drawn(examples) -> list[tuple]:
    """Everything an example draws, comparable."""
    return [(d.k, d.index, d.epoch, d.flip, d.timestep, d.caption, d.geometry_key,
             d.noise.numpy().tobytes(), d.posterior.numpy().tobytes()) for d in examples]  # fmt: skip


def test_a_global_batch_split_over_processes_and_micro_batches_draws_the_same():
    """One process at batch 4 = two processes at batch 2 = two processes at batch 1 with two
    micro-batches: example k is the same image with the same draws wherever it lands."""
    whole = batches()
    halves = [batches(batch_size=2, processes=2, rank=r) for r in range(2)]
    quarters = [batches(batch_size=1, grad_accum=2, processes=2, rank=r) for r in range(2)]
    for step in range(4):
        want = drawn(whole.batch(step, 0).examples)
        two = [d for b in halves for d in b.batch(step, 0).examples]
        four = [d for micro in range(2) for b in quarters for d in b.batch(step, micro).examples]
        assert sorted(drawn(two)) == sorted(want) == sorted(drawn(four))


def test_an_example_draws_the_same_whenever_and_in_whatever_order_it_is_asked():
    """A resumed run asks step 7 first, in a fresh object, with the global RNG elsewhere."""
    first = batches()
    in_order = [drawn(first.batch(step, 0).examples) for step in range(8)]
    torch.manual_seed(99)
    np.random.seed(99)
    again = batches()
    assert [drawn(again.batch(step, 0).examples) for step in reversed(range(8))] == in_order[::-1]
    assert drawn(batches(seed=4).batch(0, 0).examples) != in_order[0]  # the seed matters


def test_every_epoch_shows_every_image_once_in_its_own_order():
    schedule = batches(batch_size=5)
    epochs = [[d.index for d in schedule.batch(step, 0).examples] for step in range(4)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert [d.epoch for d in schedule.batch(2, 0).examples] == [2] * 5


def test_flips_follow_the_probability_and_are_drawn_whatever_it_is():
    """The flip is the first draw of an example's stream, so the noise and timestep that
    follow are the same for every flip probability."""
    draws = {p: batches(random_flip=p).batch(1, 0).examples for p in (0.0, 0.5, 1.0)}
    assert not any(d.flip for d in draws[0.0]) and all(d.flip for d in draws[1.0])
    many = [d.flip for step in range(10) for d in batches().batch(step, 0).examples]
    assert 0.3 < sum(many) / len(many) < 0.7
    for p in (0.5, 1.0):
        assert [(d.timestep, d.noise.sum()) for d in draws[p]] == [
            (d.timestep, d.noise.sum()) for d in draws[0.0]
        ]


def test_captions_draw_from_their_own_streams():
    """Shuffling, templates and dropout change only the captions; dropout empties about its
    share; the other draws stay those of the plain schedule."""
    plain = batches().batch(0, 0).examples
    dropped = [d for step in range(10) for d in batches(caption_draws=CaptionDraws(
        dropout=0.5)).batch(step, 0).examples]  # fmt: skip
    assert 0.3 < sum(d.caption == "" for d in dropped) / len(dropped) < 0.7
    mixed = batches(caption_draws=CaptionDraws(shuffle=True, templates=True)).batch(0, 0)
    for a, b in zip(plain, mixed.examples, strict=True):
        assert (a.flip, a.timestep, a.index) == (b.flip, b.timestep, b.index)
        assert torch.equal(a.noise, b.noise) and a.caption != b.caption
        assert b.caption.split(", ")[0].endswith("<V>")  # keep_tokens 1 keeps the first phrase


def test_the_noise_offset_adds_a_per_channel_constant_drawn_after_the_noise():
    plain = batches().batch(0, 0).examples
    offset = batches(noise_offset=0.1).batch(0, 0).examples
    for a, b in zip(plain, offset, strict=True):
        shift = b.noise - a.noise  # (C, h, w): one value per channel
        assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)
        assert shift.abs().max() > 0


def test_class_examples_follow_each_concept_example_with_draws_of_their_own():
    plain = batches().batch(0, 0)
    prior = batches(class_captions=["a photo of a dog"] * 3).batch(0, 0)
    assert prior.prior_from == 4 and len(prior.examples) == 8
    assert drawn(prior.concept) == drawn(plain.examples)  # the concept's draws are unchanged
    assert [d.k for d in prior.classes] == [d.k for d in prior.concept]
    assert {d.caption for d in prior.classes} == {"a photo of a dog"}
    assert all(not torch.equal(a.noise, b.noise) for a, b in zip(prior.concept, prior.classes,
                                                                  strict=True))  # fmt: skip


def test_a_bucketed_schedule_gives_chunks_of_one_size_and_latents_to_match():
    sizes = [(24, 40), (32, 32), (24, 40), (40, 24), (32, 32)]
    order = sorted(set(sizes))
    schedule = batches(batch_size=2, sizes=sizes,
                       buckets=BucketBatches([order.index(s) for s in sizes], 2, 3))  # fmt: skip
    seen = set()
    for step in range(6):
        batch = schedule.batch(step, 0)
        assert {sizes[d.index] for d in batch.examples} == {batch.size}
        w, h = batch.size
        assert all(d.noise.shape == (4, h // 8, w // 8) for d in batch.examples)
        seen.add(batch.size)
    assert seen == set(sizes)
    with pytest.raises(ValueError, match="sizes and buckets go together"):
        batches(sizes=sizes)
