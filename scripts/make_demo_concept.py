"""Write the demo concept's training images: configs/concepts/demo/ (10 PNG + caption pairs).

    python scripts/make_demo_concept.py            # seed 0, what is shipped
    python scripts/make_demo_concept.py --portrait # configs/concepts/demo-portrait/
    python scripts/make_demo_concept.py --masks    # configs/concepts/demo-mos/

``--portrait`` writes the same scenes as 32 x 48 portraits (configs/concepts/demo-portrait.yaml):
the 32 px photo on the top or the bottom two thirds (alternately), the rest its background
drawn again, so a centre square crop cuts a quarter of the heart away and an aspect-ratio
bucket (``--set buckets=true``) keeps it whole; the measurement is in docs/benchmarks.md.

``--masks`` writes the same 10 photos (the same pixels) in Mix-of-Show's layout, ``image/``,
``caption/`` and ``mask/`` (the heart's silhouette), for configs/concepts/demo-mos.yaml: the
paper's diffusion setup (masked loss, attention regularisation) scaled to the miniature.

The concept is the world's held-out object (``world.HELD_OUT``, a heart): the miniature base
model never saw it. Its 10 images are photos only, in 6 of the 8 colours on 4 of the 6
backgrounds, with jittered pose and lighting like the pretraining images. Captions name the
colour and background and say ``<TOK>`` for the object, so configs/concepts/demo.yaml can call
the token anything. What the captions never show (green, orange, grass, a blue background, a
pencil sketch) is what ``sai-eval`` asks for to see whether the concept generalises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sai_diffusion.files.concept_data import TOKEN_PLACEHOLDER
from sai_diffusion.fsutil import atomic_dir
from sai_diffusion.miniature import world

# (colour, background): four colours on two backgrounds each, every background twice, then
# white and black once. The two extra colours are what lifted the demo over 0.6 concept
# fidelity (0.53 over 2 seeds -> 0.62 over 4, docs/benchmarks.md): the more colours the token
# is seen in, the less its shape leans on the colour words.
TRAINING_SCENES = (
    ("red", "white"),
    ("red", "black"),
    ("blue", "white"),
    ("blue", "dots"),
    ("yellow", "black"),
    ("yellow", "stripes"),
    ("purple", "dots"),
    ("purple", "stripes"),
    ("white", "black"),
    ("black", "dots"),
)
RESOLUTION = 32  # the miniature model's native size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent.parent
    p.add_argument("--out", type=Path, default=here / "configs" / "concepts" / "demo")
    p.add_argument("--seed", type=int, default=0)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--portrait", action="store_true", help="32 x 48 photos (see above)")
    shape.add_argument("--masks", action="store_true", help="Mix-of-Show layout with masks")
    args = p.parse_args(argv)
    if args.out == p.get_default("out") and (args.portrait or args.masks):
        args.out = (
            here / "configs" / "concepts" / ("demo-portrait" if args.portrait else "demo-mos")
        )

    rng = np.random.default_rng(args.seed)
    examples, masks = [], []
    for colour, background in TRAINING_SCENES:
        scene = world.Scene(world.HELD_OUT, colour, background, world.PHOTO)
        image, mask = world.render_with_mask(scene, size=RESOLUTION, rng=rng)
        if args.portrait:
            image = portrait(image, background, top=len(examples) % 2 == 0, rng=rng)
        text = world.caption(scene).replace(world.HELD_OUT, TOKEN_PLACEHOLDER)
        examples.append(world.WorldExample(scene, image, text))
        masks.append(mask)
    if args.masks:
        write_mix_of_show(examples, masks, args.out)
    else:
        world.write_examples(examples, args.out)
    print(f"wrote {len(examples)} images to {args.out}")
    return 0


def write_mix_of_show(examples, masks, folder: Path) -> None:
    """image/00000.png, caption/00000.txt and mask/00000.png per example; the folder appears
    complete or not at all."""
    with atomic_dir(folder) as tmp:
        for sub in ("image", "caption", "mask"):
            (tmp / sub).mkdir()
        for i, (example, mask) in enumerate(zip(examples, masks, strict=True)):
            example.image.save(tmp / "image" / f"{i:05d}.png")
            (tmp / "caption" / f"{i:05d}.txt").write_text(example.caption + "\n", encoding="utf-8")
            mask.save(tmp / "mask" / f"{i:05d}.png")


def portrait(photo, background: str, *, top: bool, rng: np.random.Generator):
    """The square ``photo`` on the top (or bottom) of a portrait half as tall again, the rest
    filled with ``background`` drawn at that size."""
    side = photo.size[0]
    canvas = world.render_empty(background, size=side * 3 // 2, rng=rng).crop(
        (0, 0, side, side * 3 // 2)
    )
    canvas.paste(photo, (0, 0 if top else side // 2))
    return canvas


if __name__ == "__main__":
    sys.exit(main())
