"""Image generation with fixed seeds: validation during training, ``sai-sample``, comparisons."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image


@dataclass
class SampleSettings:
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    height: int = 512
    width: int = 512


def sampling_pipeline(
    *, vae, text_encoder, tokenizer, unet, scheduler_config
) -> StableDiffusionPipeline:
    """A pipeline over live training modules, with DPM-Solver++ as Mix-of-Show samples."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline, prompt: str, seed: int, settings: SampleSettings
) -> Image.Image:
    """One image; the same (prompt, seed, settings) gives the same image on the same device."""
    device = pipe.unet.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # latents drawn on the CPU so that a seed means the same image on every device
    shape = (
        1,
        pipe.unet.config.in_channels,
        settings.height // pipe.vae_scale_factor,
        settings.width // pipe.vae_scale_factor,
    )
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(
        device, pipe.unet.dtype
    )
    out = pipe(
        prompt,
        negative_prompt=settings.negative_prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        latents=latents,
        output_type="pil",
    )
    return out.images[0]


def sample_file_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:02d}-s{seed}.png"


def write_samples(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    settings: SampleSettings,
    out_dir: Path,
) -> list[Path]:
    from .fsutil import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pi, prompt in enumerate(prompts):
        for seed in seeds:
            image = generate(pipe, prompt, seed, settings)
            path = out_dir / sample_file_name(pi, seed)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return paths
