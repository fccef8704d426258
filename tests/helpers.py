"""Helpers shared by the tests that need a concept folder or finished tiny runs."""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image

from sai_diffusion import cli


def make_concept(root: Path, n: int = 3, *, layout: str = "flat") -> Path:
    """A concept YAML plus n coloured images with captions, in ``root``."""
    data = root / "data"
    images = data / "image" if layout == "mix" else data
    images.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (80, 72), (40 * i, 200 - 30 * i, 90))
        for x in range(10 + 5 * i, 40):
            img.putpixel((x, 30), (255, 255, 255))
        img.save(images / f"img{i}.png")
        caption = f"a photo of <TOK> number {i}"
        if layout == "mix":
            (data / "caption").mkdir(exist_ok=True)
            (data / "caption" / f"img{i}.txt").write_text(caption)
        else:
            (data / f"img{i}.txt").write_text(caption)
    concept = root / "thing.yaml"
    concept.write_text(
        yaml.safe_dump(
            {
                "token": "<Vthing>",
                "class_word": "dog",
                "data": "data",
                "validation_prompts": ["a photo of {token}", "a pencil sketch of {token}"],
                "lr": {"sgd-sai": 0.05},
            }
        )
    )
    return concept


def train_tiny(
    concept: Path, base: Path, out: Path, optimizer: str, *extra: str, steps: int = 2
) -> Path:
    """Train a finished tiny run in-process (64 px); ``extra`` are more CLI arguments."""
    args = ["--concept", str(concept), "--base-model", str(base), "--optimizer", optimizer,
            "--max-steps", str(steps), "--resolution", "64", "--output-dir", str(out), *extra]  # fmt: skip
    assert cli.train_main(args) == 0
    return out
