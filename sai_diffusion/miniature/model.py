"""The miniature base model: a tiny SD-1.5-architecture pipeline pretrained on the world.

``configs/miniature/`` (``miniature_dir()``) is a diffusers folder (safetensors) written by
``scripts/pretrain_world.py``, with ``pretrain.json`` recording how it was made and how the
judge scored it. This module measures a pipeline with the judge:

    pipe = load_base_model(miniature_dir())
    report = evaluate_base(pipe, evaluation_scenes(), seeds=[0, 1])
    report["seen"]["object"]       # judge accuracy on prompts of pretraining objects
    report["held_out"]["object"]   # how often a HELD_OUT prompt is drawn as HELD_OUT (low)

Prompts are the world's canonical captions ("a photo of a red star on a blue background",
"a pencil sketch of a star"), generated with ``models.sampling`` (DPM-Solver++, latents drawn
on the CPU from the seed), so a (prompt, seed) gives the same image on every device.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from diffusers import StableDiffusionPipeline
from PIL import Image

from ..compare.grid import make_grid
from ..models.sampling import (
    SCHEDULER,
    SampleSettings,
    generate_batch,
    native_resolution,
    sampling_pipeline,
)
from . import world
from .judge import HEADS, Judge, accuracy, describe

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "evaluate_base",
    "evaluation_scenes",
    "generate_images",
    "sample_grid",
]

DEFAULT_STEPS = 20  # DPM-Solver++ steps
DEFAULT_GUIDANCE = 6.0


def evaluation_scenes(photos_per_object: int = 4) -> list[world.Scene]:
    """Per object (``HELD_OUT`` included): ``photos_per_object`` photos, then one sketch.

    (colour, background) pairs walk ``world.photo_pairs()`` with a stride coprime to its
    length, so every colour and every background appears and each object gets different ones.
    """
    pairs = world.photo_pairs()
    stride = 7  # coprime with the 41 pairs
    scenes, k = [], 0
    for obj in world.OBJECTS:
        for _ in range(photos_per_object):
            colour, background = pairs[(k * stride) % len(pairs)]
            scenes.append(world.Scene(obj, colour, background, world.PHOTO))
            k += 1
        scenes.append(world.Scene(obj, None, None, world.SKETCH))
    return scenes


def generate_images(
    pipe: StableDiffusionPipeline,
    prompt: str,
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> list[Image.Image]:
    """One image per seed of ``prompt`` at the model's native size, in one batch."""
    side = native_resolution(pipe)
    settings = SampleSettings(steps=steps, guidance_scale=guidance, height=side, width=side)
    return generate_batch(sampling_pipeline(pipe), prompt, seeds, settings)


def evaluate_base(
    pipe: StableDiffusionPipeline,
    scenes: Sequence[world.Scene],
    seeds: Sequence[int],
    *,
    judge: Judge | None = None,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> dict:
    """Generate every scene's canonical caption with every seed and let the judge read them.

    Returns ``{"seen": {head: accuracy}, "held_out": {head: accuracy}, "per_prompt": [...],
    "settings": {...}}``. ``seen`` covers the pretraining objects, ``held_out`` the
    ``HELD_OUT`` prompts, whose object accuracy should stay low: the model has never seen
    it. Colour and background count photos only (``judge.accuracy``).
    """
    judge = judge or Judge.load()
    predictions, truths, per_prompt = [], [], []
    for scene in scenes:
        prompt = world.caption(scene)
        images = generate_images(pipe, prompt, seeds, steps=steps, guidance=guidance)
        judged = judge.predict(images)
        predictions += judged
        truths += [scene] * len(seeds)
        per_prompt.append({"prompt": prompt, "judged": [describe(p) for p in judged]})

    def score(keep) -> dict[str, float]:
        kept = [(p, s) for p, s in zip(predictions, truths, strict=True) if keep(s)]
        if not kept:
            return {name: float("nan") for name in HEADS}
        result = accuracy([p for p, _ in kept], [s for _, s in kept])
        return {name: round(v, 4) for name, v in result.items()}

    return {
        "seen": score(lambda s: s.object != world.HELD_OUT),
        "held_out": score(lambda s: s.object == world.HELD_OUT),
        "per_prompt": per_prompt,
        "settings": {
            "sampler": SCHEDULER,
            "steps": steps,
            "guidance": guidance,
            "seeds": list(seeds),
            "prompts": len(scenes),
            "images": len(predictions),
        },
    }


def sample_grid(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    upscale: int = 2,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    title: str | None = None,
) -> Image.Image:
    """A labelled grid: one row per prompt, one column per seed; tiles upscaled (nearest) so
    32 px images stay visible."""
    rows = {}
    for prompt in prompts:
        images = generate_images(pipe, prompt, seeds, steps=steps, guidance=guidance)
        rows[prompt] = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
                        for im in images]  # fmt: skip
    return make_grid(
        rows,
        row_labels={p: textwrap.fill(p, 24) for p in prompts},
        col_labels=[f"seed {s}" for s in seeds],
        title=title,
    )
