"""Shared fixtures: one tiny SD-1.5-architecture model per test session.

Treat both as read-only (copy them with shutil.copytree / shutil.copy to modify): every test
in the session shares them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from sai_diffusion.files.ldm import save_single_file
from sai_diffusion.miniature.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny diffusers folder (model_index.json, safetensors weights), seed 0."""
    out = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_single_file(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as one original-layout (LDM) .safetensors checkpoint.

    Load it with ``base_config=tiny_pipeline_dir`` (its architecture is not SD 1.5's size).
    """
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    return save_single_file(pipe, tmp_path_factory.mktemp("tiny-single") / "tiny.safetensors")
