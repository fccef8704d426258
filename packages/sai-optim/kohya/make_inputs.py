"""Inputs for the kohya sd-scripts check (docs/optimizer.md#kohya-sd-scripts-run-for-real):
SD 1.5 at full size with random weights as one original-layout .safetensors file, the SD 1.5
tokenizer where kohya's --tokenizer_cache_dir looks for it, and one 64 px captioned image.

    .venv/bin/python packages/sai-optim/kohya/make_inputs.py /tmp/kohya-run

Runs in this repository's venv (diffusers, transformers, sai_diffusion): the model is
configs/sd15 with random weights (seed 0), written by sai_diffusion.files.ldm; no download.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sai_diffusion._resources import sd15_config_dir
from sai_diffusion.files.ldm import save_single_file


def sd15_random(out: Path) -> Path:
    """SD 1.5's architecture, random weights, about 4 GB in float32, as one single file."""
    scripts = Path(__file__).resolve().parents[3] / "scripts"
    sys.path.insert(0, str(scripts))  # the benchmark's builder of the random SD 1.5
    from bench_train import sd15_random_pipeline

    return save_single_file(sd15_random_pipeline(seed=0), out)


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    model = root / "sd15_random.safetensors"
    if not model.is_file():
        sd15_random(model)
    # kohya loads "openai/clip-vit-large-patch14" from <cache>/openai_clip-vit-large-patch14
    tokenizer = root / "tokenizers" / "openai_clip-vit-large-patch14"
    if not tokenizer.is_dir():
        shutil.copytree(sd15_config_dir() / "tokenizer", tokenizer)
    # kohya's DreamBooth layout: <repeats>_<name>/ with an image and its .txt caption
    data = root / "data" / "1_sks"
    data.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    image = np.full((64, 64, 3), 128, np.uint8)
    image[(yy - 32) ** 2 + (xx - 32) ** 2 < 20**2] = (200, 30, 30)  # a red disc on grey
    Image.fromarray(image).save(data / "disc.png")
    (data / "disc.txt").write_text("a photo of sks disc")
    print(f"{model} ({model.stat().st_size / 2**30:.2f} GiB), {tokenizer}, {data}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
