"""Helpers shared by the tests: a concept folder, finished tiny runs, and the reference outputs
of a tiny pipeline (for LoRA and token files that must load back exactly)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention
from PIL import Image

from sai_diffusion import cli
from sai_diffusion.config import DEFAULT_LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS

TOKEN = "<Vpotter>"
PROMPT = f"a pencil sketch of {TOKEN}"
ATOL = 1e-5  # fp32 on the CPU: a file that loads back must give the in-memory model's outputs


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


# a real `sai-train-lora` process (the installed script may be missing in a bare checkout)
TRAIN_COMMAND = [sys.executable, "-c", "from sai_diffusion.cli import train_entry; train_entry()"]


def run_train(*args: str, timeout: int = 240, preexec=None) -> subprocess.CompletedProcess:
    """``sai-train-lora ARGS`` as its own process; ``preexec`` runs in the child first."""
    return subprocess.run(
        [*TRAIN_COMMAND, *args], capture_output=True, text=True, timeout=timeout,
        preexec_fn=preexec,
    )  # fmt: skip


def train_tiny(
    concept: Path, base: Path, out: Path, optimizer: str, *extra: str, steps: int = 2
) -> Path:
    """Train a finished tiny run in-process (64 px); ``extra`` are more CLI arguments."""
    args = ["--concept", str(concept), "--base-model", str(base), "--optimizer", optimizer,
            "--max-steps", str(steps), "--resolution", "64", "--output-dir", str(out), *extra]  # fmt: skip
    assert cli.train_main(args) == 0
    return out


def setup_run(concept: Path, base: Path, out: Path, *settings: str, steps: int = 3,
              batch: int = 4, resolution: int = 64):  # fmt: skip
    """``recipe.setup`` of a tiny run (no samples, one checkpoint at the end); ``settings`` are
    ``--set`` items."""
    from sai_diffusion import config
    from sai_diffusion.training import recipe

    flags = {"base_model": str(base), "resolution": resolution, "max_steps": steps,
             "batch_size": batch}  # fmt: skip
    cfg, c = config.resolve(str(concept), flags,
                            ["validation_seeds=[]", "checkpoint_every=0", *settings])  # fmt: skip
    return recipe.setup(cfg, c, out)


def load_pipe(base_dir: Path) -> StableDiffusionPipeline:
    """A fresh stock pipeline from conftest's read-only tiny folder (``tiny_pipeline_dir``)."""
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """Text-encoder states of PROMPT, and UNet noise predictions on fixed inputs."""
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    fixed_context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    text = pipe.text_encoder(ids)[0]  # (1, 77, 32)
    unet_alone = pipe.unet(latents, 500, encoder_hidden_states=fixed_context).sample
    unet_on_prompt = pipe.unet(latents, 500, encoder_hidden_states=text).sample
    return {"text_encoder": text, "unet": unet_alone, "unet_on_prompt": unet_on_prompt}


def assert_outputs_close(got: dict, want: dict, atol: float = ATOL) -> None:
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol}"


def lora_module_count(pipe) -> tuple[int, int]:
    """Expected LoRA modules: 4 per UNet attention block, 4 per text-encoder layer."""
    attentions = sum(isinstance(m, Attention) for m in pipe.unet.modules())
    layers = pipe.text_encoder.config.num_hidden_layers
    return attentions * len(DEFAULT_LORA_TARGETS), layers * len(TEXT_ENCODER_LORA_TARGETS)


def assert_same_weights(a: StableDiffusionPipeline, b: StableDiffusionPipeline) -> None:
    """UNet, VAE and text encoder hold bit-identical tensors under the same names."""
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def concept_file(tmp_path, token: str, class_word: str):
    """A concept YAML with ``token`` and ``class_word`` over an empty image folder."""
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(f'token: "{token}"\nclass_word: "{class_word}"\ndata: img\n'
                    'validation_prompts: ["a pencil sketch of {token}"]\n')  # fmt: skip
    return path
