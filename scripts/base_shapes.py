"""How well the miniature base model draws the shapes it knows: the shape fits of sai-eval
(``miniature/shape.py``) on its own images, the yardstick for the demo's hearts.

    python scripts/base_shapes.py            # 6 objects x 4 plain scenes x 8 seeds, ~1 min

Each object is asked for in four photo prompts on plain backgrounds ("a photo of a red star on a
white background", ...), 8 seeds each, with the demo's sampler settings (20 steps, guidance
6). Every image's object is cut out and fitted with the world's silhouette of the object asked
for and of a rival (the circle; the heart for the circle): the mean IoU of each, and the share
of images whose own fit beats the rival's by ``SHAPE_MARGIN``, as sai-eval's ``shape_iou``,
``class_shape_iou`` and ``shape_share``. The heart is the held-out object: the base model
never saw one, so its row is the floor a LoRA starts from.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from sai_diffusion._resources import miniature_dir
from sai_diffusion.miniature import shape
from sai_diffusion.miniature.evaluate import SHAPE_MARGIN
from sai_diffusion.miniature.model import generate_images
from sai_diffusion.models.base import load_base_model

SCENES = (("red", "white"), ("green", "black"), ("orange", "white"), ("yellow", "blue"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objects", default="circle,square,star,triangle,cross,heart")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_base_model(miniature_dir())
    print("| object asked for | shape IoU | rival (IoU) | shape share |")
    print("|---|---:|---:|---:|")
    for obj in args.objects.split(","):
        rival = "heart" if obj == "circle" else "circle"
        own, other = [], []
        for colour, background in SCENES:
            prompt = f"a photo of a {colour} {obj} on a {background} background"
            for image in generate_images(pipe, prompt, range(args.seeds), steps=20, guidance=6.0):
                mask = shape.silhouette(image, background)
                own.append(shape.best_fit_iou(mask, obj)[0])
                other.append(shape.best_fit_iou(mask, rival)[0])
        share = sum(o >= r + SHAPE_MARGIN for o, r in zip(own, other, strict=True)) / len(own)
        print(f"| {obj} | {statistics.fmean(own):.3f} | {rival} ({statistics.fmean(other):.3f}) "
              f"| {share:.2f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
