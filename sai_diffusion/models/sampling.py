"""Image generation with fixed seeds: validation during training, ``sai-sample``, comparisons and
evaluation all sample through here. ``sampling_pipeline`` puts a pipeline under DPM-Solver++, as
Mix-of-Show samples (validation, comparisons, evaluation); ``sai-sample`` keeps the base model's
own scheduler.

A seed means the same image on every device: each seed's latents are drawn alone on the CPU,
then moved to the model. ``generate`` makes one image; ``generate_batch`` makes one per seed in
a single batch (faster, and the same image per seed up to float rounding of the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ..config import TrainConfig
from ..files.run_dir import sample_name, write_prompts
from ..fsutil import atomic_path
from .edlora import encode_layerwise, layer_words, spread
from .family import family_of

SCHEDULER = "DPM-Solver++ multistep"  # what reports call the sampler


@dataclass
class SampleSettings:
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    height: int = 512
    width: int = 512

    @classmethod
    def of_run(cls, cfg: TrainConfig) -> SampleSettings:
        """A training run's sampling (validation samples, class images): its sample_steps,
        guidance_scale and negative_prompt, at its resolution."""
        return cls(steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance_scale,
                   negative_prompt=cfg.sampling.negative_prompt, height=cfg.resolution,
                   width=cfg.resolution)  # fmt: skip


def sampling_pipeline(pipe, *, scheduler: str = "dpm-solver", **modules):
    """``pipe``'s modules as a sampling pipeline of its family (``models.family``): DPM-Solver++
    from ``pipe``'s noise schedule (``scheduler="native"``: the model's own), no safety checker,
    no progress bar. ``modules`` replace some of them (``unet=...``, ``text_encoder=...``):
    training samples its live, unwrapped modules this way."""
    return family_of(pipe).sampling_pipeline(pipe, scheduler=scheduler, **modules)


def native_resolution(pipe: StableDiffusionPipeline) -> int:
    """The image side the UNet was built for (its sample size times the VAE's factor)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _latents(pipe: StableDiffusionPipeline, seeds: Sequence[int], settings: SampleSettings):
    """(S, C, h, w): each seed's starting noise, drawn alone on the CPU."""
    shape = (
        pipe.unet.config.in_channels,
        settings.height // pipe.vae_scale_factor,
        settings.width // pipe.vae_scale_factor,
    )
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(pipe.unet.device, pipe.unet.dtype)


@torch.no_grad()
def generate_batch(
    pipe: StableDiffusionPipeline, prompt: str, seeds: Sequence[int], settings: SampleSettings
) -> list[Image.Image]:
    """One image of ``prompt`` per seed, in one batch; ``pipe`` from ``sampling_pipeline``.

    A prompt naming ED-LoRA words (``models.edlora``) is encoded layer by layer, with the
    negative prompt shared by all layers."""
    negative = settings.negative_prompt
    texts = {"prompt": [prompt] * len(seeds)}
    if negative is not None:
        texts["negative_prompt"] = [negative] * len(seeds)
    words = layer_words(pipe.unet)
    if words is not None and words.uses(prompt):
        device = pipe.text_encoder.device
        embeds = encode_layerwise(pipe.tokenizer, pipe.text_encoder, [prompt], words, device=device)
        plain = encode_layerwise(pipe.tokenizer, pipe.text_encoder, [negative or ""], None,
                                 device=device)  # fmt: skip
        texts = {
            "prompt_embeds": embeds.expand(len(seeds), -1, -1),
            "negative_prompt_embeds": spread(plain, words.layers).expand(len(seeds), -1, -1),
        }
    out = pipe(
        **texts,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        latents=_latents(pipe, seeds, settings),
        output_type="pil",
    )
    return out.images


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline, prompt: str, seed: int, settings: SampleSettings
) -> Image.Image:
    """One image; the same (prompt, seed, settings) gives the same image on the same device."""
    return generate_batch(pipe, prompt, [seed], settings)[0]


def write_samples(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    settings: SampleSettings,
    out_dir: Path,
) -> list[Path]:
    """Every (prompt, seed) image as a PNG in ``out_dir``, named as run folders name samples,
    with the prompts beside them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pi, prompt in enumerate(prompts):
        for seed in seeds:
            image = generate(pipe, prompt, seed, settings)
            path = out_dir / sample_name(pi, seed)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
    write_prompts(out_dir, prompts)
    return paths
