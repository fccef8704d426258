"""Shared fixtures: one tiny SD-1.5-architecture model per test session.

Treat both as read-only (copy them with shutil.copytree / shutil.copy to modify): every test
in the session shares them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sai_diffusion.files.ldm import save_single_file
from sai_diffusion.miniature.tiny import (
    build_tiny_pipeline,
    build_tiny_sd2_pipeline,
    build_tiny_sdxl_pipeline,
)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny diffusers folder (model_index.json, safetensors weights), seed 0."""
    out = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL-architecture diffusers folder (two text encoders, size conditioning)."""
    out = tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"
    build_tiny_sdxl_pipeline(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD 2.x-architecture diffusers folder (v-prediction)."""
    out = tmp_path_factory.mktemp("tiny-sd2") / "pipeline"
    build_tiny_sd2_pipeline(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_single_file(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as one original-layout (LDM) .safetensors checkpoint.

    Load it with ``base_config=tiny_pipeline_dir`` (its architecture is not SD 1.5's size).
    """
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    return save_single_file(pipe, tmp_path_factory.mktemp("tiny-single") / "tiny.safetensors")


@pytest.fixture(scope="session")
def scorer_dirs(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny CLIPModel (SD's tiny tokenizer) and a tiny DINO-style ViTModel, random weights,
    each saved with its processor: (clip folder, dino folder)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("scorers")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(root / "clip")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root / "clip")
    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, image_size=32, patch_size=8)  # fmt: skip
    ViTModel(vit, add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"
