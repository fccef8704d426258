"""The inputs of the training benchmarks of scripts/gpu_check.sh, built where they run (nothing
is downloaded): a random-weight SD 1.5 checkpoint as one single file; a 14-image masked concept
in Mix-of-Show's layout; copies of configs/concepts/potter.yaml and potter-edlora.yaml whose
``data`` points at it (every other line as shipped); and a plain concept on the same images,
without their ``train:`` presets.

    python scripts/gpu_inputs.py --out /tmp/gpu-inputs                     # SD 1.5, 512 px
    python scripts/gpu_inputs.py --out /tmp/dry --model tiny --image-size 64   # CPU dry run

Writes, in ``--out``:
  model.safetensors          the model, original (LDM) layout as users have their checkpoints:
                             ``sd15`` the SD 1.5 architecture of configs/sd15 (fp16 weights,
                             2.1 GB, as many shared checkpoints are), ``tiny`` the tiny SD
                             1.5-architecture model of the tests
  model-config/              (tiny only) the config folder its single file loads with
  potter/image|mask|caption  14 images (a figure on a background), its masks and captions
  potter.yaml, potter-edlora.yaml
  potter-plain.yaml          potter's words and images, every setting left at its default
and prints one JSON line naming them, with the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from sai_diffusion._resources import configs_dir

PRESETS = ("potter", "potter-edlora")
NUM_IMAGES = 14  # Mix-of-Show's potter set
PLACES = ("a library", "a garden", "a street", "a beach", "a kitchen", "a forest", "a station")


# ------------------------------------------------------------------------------- the model
def build_model(out: Path, kind: str, seed: int) -> dict[str, str]:
    """``out/model.safetensors`` (and the config folder a tiny one needs): the paths to give
    bench_train as ``--base-model`` and ``--base-config``."""
    from sai_diffusion.files.ldm import save_single_file

    path = out / "model.safetensors"
    if kind == "tiny":
        from sai_diffusion.miniature.tiny import build_tiny_pipeline

        config = out / "model-config"
        save_single_file(build_tiny_pipeline(config, seed=seed), path)
        return dict(base_model=str(path), base_config=str(config))
    import torch
    from bench_train import sd15_random_pipeline

    save_single_file(sd15_random_pipeline(seed), path, dtype=torch.float16)
    return dict(base_model=str(path), base_config="")  # the shipped configs/sd15


# ----------------------------------------------------------------------------- the concept
def figure(size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A person-like figure (head and body) on a shaded, noisy background, and its mask."""
    width, height = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    cx = width * rng.uniform(0.35, 0.65)
    head = min(width, height) * rng.uniform(0.08, 0.12)
    top = height * rng.uniform(0.1, 0.25)
    draw.ellipse((cx - head, top, cx + head, top + 2 * head), fill=255)
    shoulders = head * rng.uniform(1.6, 2.2)
    draw.rounded_rectangle((cx - shoulders, top + 2.2 * head, cx + shoulders, height),
                           radius=head, fill=255)  # fmt: skip
    rows = np.linspace(0, 1, height)[:, None, None]  # (H, 1, 1): a vertical shade
    sky, ground = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    background = (1 - rows) * sky + rows * ground + rng.normal(0, 12, (height, width, 3))
    colour = rng.uniform(0, 255, 3) + rng.normal(0, 6, (height, width, 3))  # (H, W, 3)
    inside = (np.asarray(mask) > 0)[..., None]
    pixels = np.where(inside, colour, background)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, mask


def build_concept(out: Path, image_size: int, seed: int) -> list[Path]:
    """``out/potter`` in Mix-of-Show's layout (image/, mask/, caption/ with one basename per
    example; portraits, landscapes and squares around ``image_size``) and the concept YAMLs
    beside it."""
    rng = np.random.default_rng(seed)
    data = out / "potter"
    for part in ("image", "mask", "caption"):
        (data / part).mkdir(parents=True, exist_ok=True)
    for i in range(NUM_IMAGES):
        aspect = (1.25, 0.8, 1.0)[i % 3]  # height / width
        size = (image_size, round(image_size * aspect))
        image, mask = figure(size, rng)
        image.save(data / "image" / f"{i:02d}.png")
        mask.save(data / "mask" / f"{i:02d}.png")
        place = PLACES[i % len(PLACES)]
        (data / "caption" / f"{i:02d}.txt").write_text(f"<TOK>, a man standing in {place}\n")
    written = []
    for name in PRESETS:
        shipped = yaml.safe_load((configs_dir() / "concepts" / f"{name}.yaml").read_text())
        concept = out / f"{name}.yaml"
        concept.write_text(yaml.safe_dump({**shipped, "data": data.name}, sort_keys=False))
        written.append(concept)
    plain = {key: shipped[key] for key in ("token", "class_word")} | {"data": data.name}
    written.append(out / "potter-plain.yaml")
    written[-1].write_text(yaml.safe_dump(plain, sort_keys=False))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--image-size", type=int, default=512, help="the images' width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    concepts = build_concept(args.out, args.image_size, args.seed)
    concept_s = time.perf_counter() - start
    model = build_model(args.out, args.model, args.seed)
    model_s = time.perf_counter() - start - concept_s
    print(json.dumps(dict(model, concepts=[str(c) for c in concepts], concept_s=concept_s,
                          model_s=model_s)))  # fmt: skip


if __name__ == "__main__":
    main()
