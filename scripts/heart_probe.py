"""Where a demo LoRA's heart shape is lost: the VAE, or the UNet's denoising at each noise level.

    python scripts/heart_probe.py                                # the VAE and the base model
    python scripts/heart_probe.py RUN_DIR [RUN_DIR ...]          # and each run's LoRA

1. The VAE round trip: world photos of the heart, the circle and the star on plain
   backgrounds, encoded and decoded, then fitted with the world's heart and circle
   (``miniature/shape.py``): if the decoded hearts still fit the heart, the miniature's 8 x 8
   latents can hold the shape and a LoRA that draws blobs is the UNet's doing.
2. The denoising loss per noise level: the concept's training photos (``configs/concepts/demo``)
   noised at timesteps in 5 bands of 200, the same noise for every model, and the mean squared
   error of the predicted noise. Rows: the base model on world circles of the same colours and
   backgrounds (a shape it knows: the level to reach), on the hearts captioned with "heart" and
   with "circle", and each run on the hearts with its token. The shape is settled in the noisy
   bands (600-999); a run whose loss there stays near the base model's has not learned it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from sai_diffusion._resources import miniature_dir
from sai_diffusion.config import load_concept
from sai_diffusion.miniature import shape, world
from sai_diffusion.miniature.evaluate import SHAPE_MARGIN
from sai_diffusion.miniature.judge import uint8_to_input
from sai_diffusion.models.base import load_base_model
from sai_diffusion.models.inference import load_run

BANDS = tuple(range(0, 1000, 200))
BACKGROUND_WORDS = {"dotted": "dots", "striped": "stripes"}  # caption word -> world name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="sai-train-lora runs of the demo concept")
    p.add_argument("--images", type=int, default=24, help="VAE round trips per object")
    p.add_argument("--draws", type=int, default=16, help="noise draws per photo and band")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_base_model(miniature_dir())
    vae_round_trip(pipe, args.images)
    denoising_by_noise_level(pipe, args.runs, args.draws)
    return 0


def vae_round_trip(pipe, n: int) -> None:
    print("| object | decoded: heart IoU | decoded: circle IoU | fits the heart by 0.1 more |")
    print("|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for obj in ("heart", "circle", "star"):
        own, rival = [], []
        for i in range(n):
            colour, background = (("red", "white"), ("yellow", "black"))[i % 2]
            photo = world.render(world.Scene(obj, colour, background), 32, rng)
            with torch.no_grad():
                latents = pipe.vae.encode(_pixels([photo])).latent_dist.mean
                decoded = _images(pipe.vae.decode(latents).sample)[0]
            mask = shape.silhouette(decoded, background)
            own.append(shape.best_fit_iou(mask, "heart")[0])
            rival.append(shape.best_fit_iou(mask, "circle")[0])
        share = np.mean([o >= r + SHAPE_MARGIN for o, r in zip(own, rival, strict=True)])
        print(f"| {obj} | {np.mean(own):.3f} | {np.mean(rival):.3f} | {share:.2f} |")


def denoising_by_noise_level(pipe, runs: list[Path], draws: int) -> None:
    concept = load_concept("demo")
    photos = sorted(Path(concept.data).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in photos]
    hearts = _latents(pipe, [Image.open(p) for p in photos])
    rng = np.random.default_rng(0)
    circles = _latents(pipe, [world.render(_scene("circle", c), 32, rng) for c in captions])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    print("\n| model, images, word | " + " | ".join(f"t {b}-{b + 199}" for b in BANDS) + " |")
    print("|---|" + "---:|" * len(BANDS))

    def row(label: str, latents: torch.Tensor, word: str) -> None:
        texts = [c.replace("<TOK>", word) for c in captions]
        losses = _band_losses(pipe, scheduler, latents, texts, draws)
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in losses) + " |", flush=True)

    row("base, world circles, circle", circles, "circle")
    row("base, hearts, heart", hearts, "heart")
    row(f"base, hearts, {concept.class_text}", hearts, concept.class_text)
    for i, run in enumerate(runs):
        load_run(pipe, run, adapter=f"run{i}")
        row(f"{run}, hearts, {concept.token}", hearts, concept.token)
        pipe.delete_adapters([f"run{i}"])


def _band_losses(pipe, scheduler, latents, texts, draws) -> list[float]:
    ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length).input_ids  # fmt: skip
    generator = torch.Generator().manual_seed(1)  # the same noise for every model
    losses = []
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        for low in BANDS:
            total = 0.0
            for _ in range(draws):
                t = torch.randint(low, low + 200, (len(latents),), generator=generator)
                noise = torch.randn(latents.shape, generator=generator)
                noisy = scheduler.add_noise(latents, noise, t)
                total += torch.mean((pipe.unet(noisy, t, states).sample - noise) ** 2).item()
            losses.append(total / draws)
    return losses


def _scene(obj: str, caption: str) -> world.Scene:
    """The world scene of ``obj`` in ``caption``'s colour and background ("a photo of a red
    <TOK> on a white background")."""
    words = caption.split()
    background = words[words.index("on") + 2]
    colour = words[words.index("<TOK>") - 1]
    return world.Scene(obj, colour, BACKGROUND_WORDS.get(background, background))


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    return uint8_to_input(
        torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    )


def _images(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def _latents(pipe, images: list[Image.Image]) -> torch.Tensor:
    with torch.no_grad():
        latents = pipe.vae.encode(_pixels(images)).latent_dist.mean
    return latents * pipe.vae.config.scaling_factor


if __name__ == "__main__":
    sys.exit(main())
