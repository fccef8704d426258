"""Loading base models: every kind of source, every way it can be wrong, and fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sai_diffusion._resources import configs_dir, sd15_config_dir
from sai_diffusion.errors import UserError
from sai_diffusion.miniature.tiny import build_tiny_pipeline
from sai_diffusion.models.base import load_base_model, model_fingerprint
from tests.helpers import assert_same_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def _reference(tiny_pipeline_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)


def _weight_free_copy(folder: Path, dest: Path) -> Path:
    """The configs and tokenizer of a diffusers folder without its weights (like configs/sd15)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def _user_error(source, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_base_model(source, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------ configs/sd15
def test_sd15_config_folder_describes_sd15_without_weights():
    """Published SD 1.5 sizes: UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text 123.06 M."""
    folder = sd15_config_dir()
    assert folder == configs_dir() / "sd15" and folder.parent == REPO_ROOT / "configs"
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["safety_checker"] == [None, None]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 123_060_480
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.cross_attention_dim == text.config.hidden_size == 768
    assert vae.config.scaling_factor == 0.18215
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert scheduler["skip_prk_steps"] and scheduler["steps_offset"] == 1
    assert scheduler["clip_sample"] is False  # as published; DDPM built from it must not clip


def test_sd15_config_folder_is_what_the_build_script_writes(tmp_path):
    """Guards the committed folder against hand edits: rebuild and compare every file."""
    spec = importlib.util.spec_from_file_location(
        "build_sd15", REPO_ROOT / "scripts" / "build_sd15_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.write_sd15_config(tmp_path / "sd15")
    shipped = sd15_config_dir()
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert names == sorted(
        p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()
    )
    for name in names:
        a, b = (built / name).read_text(), (shipped / name).read_text()
        if name.endswith(".json"):
            a, b = json.loads(a), json.loads(b)
            for d in (a, b):
                d.pop("_diffusers_version", None)
        assert a == b, name


def test_single_file_loads_through_a_weight_free_config_folder(
    tiny_pipeline_dir, tiny_single_file, tmp_path
):
    """What configs/sd15 does for SD 1.5, a weight-free copy of the tiny folder does here."""
    config = _weight_free_copy(tiny_pipeline_dir, tmp_path / "config")
    pipe = load_base_model(tiny_single_file, base_config=config)
    assert_same_weights(pipe, _reference(tiny_pipeline_dir))
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "PNDMScheduler"


# ------------------------------------------------------------------------------ good sources
def test_loads_a_diffusers_folder(tiny_pipeline_dir):
    pipe = load_base_model(tiny_pipeline_dir)
    assert_same_weights(pipe, _reference(tiny_pipeline_dir))
    assert pipe.unet.dtype == torch.float32


def test_loads_a_single_file_with_its_config_and_dtype(tiny_pipeline_dir, tiny_single_file):
    pipe = load_base_model(str(tiny_single_file), base_config=tiny_pipeline_dir)
    assert_same_weights(pipe, _reference(tiny_pipeline_dir))
    half = load_base_model(
        tiny_single_file, base_config=tiny_pipeline_dir, torch_dtype=torch.float16
    )
    assert half.unet.dtype == half.text_encoder.dtype == torch.float16


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_pipeline_dir, tiny_single_file, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_file))}, ckpt)
    message = _user_error(ckpt, base_config=tiny_pipeline_dir)
    assert (
        str(ckpt) in message and "--set allow_pickle=true" in message and "safetensors" in message
    )
    pipe = load_base_model(ckpt, base_config=tiny_pipeline_dir, allow_pickle=True)
    assert_same_weights(pipe, _reference(tiny_pipeline_dir))


def test_pickle_only_diffusers_folder_is_refused_unless_allowed(tmp_path):
    folder = tmp_path / "bin-folder"
    saved = build_tiny_pipeline(num_merges=100)
    saved.save_pretrained(folder, safe_serialization=False)
    message = _user_error(folder)
    assert str(folder) in message and "unet" in message and "allow_pickle=true" in message
    assert_same_weights(load_base_model(folder, allow_pickle=True), saved)


def test_unreachable_hub_id_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _user_error("sai-diffusion-tests/no-such-model")
    assert "sai-diffusion-tests/no-such-model" in message and "could not be loaded" in message
    assert "local diffusers folder" in message


# ------------------------------------------------------------------------------ bad sources
def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "models" / "chilloutmix.safetensors"
    message = _user_error(missing)
    assert str(missing) in message and "does not exist" in message
    with pytest.raises(UserError, match="No base model"):
        load_base_model(None)


def test_empty_folder_and_folder_without_model_index(tmp_path, tiny_single_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in _user_error(empty)
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(tiny_single_file, loose / "model.safetensors")
    message = _user_error(loose)
    assert (
        str(loose) in message and "model_index.json" in message and "model.safetensors" in message
    )


def test_diffusers_folder_with_missing_weights(tiny_pipeline_dir, tmp_path):
    broken = shutil.copytree(tiny_pipeline_dir, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    message = _user_error(broken)
    assert str(broken) in message and "complete" in message


def test_truncated_safetensors_is_called_corrupt(tiny_single_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    data = tiny_single_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    message = _user_error(truncated, base_config=tmp_path)
    assert str(truncated) in message and "truncated or corrupt" in message


def test_architecture_mismatch_names_file_and_config(tiny_single_file, tiny_pipeline_dir, tmp_path):
    # the tiny checkpoint against the full-size SD 1.5 configs (the default)
    message = _user_error(tiny_single_file)
    assert str(tiny_single_file) in message and str(sd15_config_dir()) in message
    assert "expected shape" in message and "--base-config" in message
    # ... and against a tiny config of another width
    other = tmp_path / "other"
    build_tiny_pipeline(other, unet_channels=(16, 32), num_merges=100)
    message = _user_error(tiny_single_file, base_config=other)
    assert str(tiny_single_file) in message and str(other) in message


@pytest.mark.parametrize(
    "dropped",
    [
        # diffusers fails on it with "Cannot copy out of meta tensor"
        "first_stage_model.decoder.conv_out.bias",
        # diffusers leaves it on the meta device without a word
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
    ],
)
def test_checkpoint_missing_a_weight_names_it(
    dropped, tiny_single_file, tiny_pipeline_dir, tmp_path
):
    state = load_file(str(tiny_single_file))
    del state[dropped]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    message = _user_error(partial, base_config=tiny_pipeline_dir)
    assert str(partial) in message and "lacks 1" in message
    assert dropped.rsplit(".", 2)[-2] in message  # conv_out / final_layer_norm


def test_file_without_unet_weights_is_named_for_what_it_is(tiny_pipeline_dir, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, str(lora))
    assert "LoRA file" in _user_error(lora)
    component = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert "one component of a diffusers folder" in _user_error(component)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(unet_only))
    assert "first_stage_model" in _user_error(unet_only)


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("conditioner.embedders.1.model.transformer.resblocks.0.ln_1.bias", "SDXL"),
        ("cond_stage_model.model.transformer.resblocks.0.ln_1.bias", "SD 2.x"),
    ],
)
def test_sdxl_and_sd2_files_are_named_as_such(key, family, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4), key: torch.zeros(4)}, str(path))
    message = _user_error(path)
    assert str(path) in message and family in message and "SD 1.5" in message


def test_unknown_file_type(tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    message = _user_error(text)
    assert str(text) in message and ".safetensors" in message


# ------------------------------------------------------------------------------ fingerprints
def test_fingerprint_of_a_file_is_its_sha256(tiny_single_file):
    expected = hashlib.sha256(tiny_single_file.read_bytes()).hexdigest()
    assert model_fingerprint(tiny_single_file) == f"sha256:{expected}"


def test_fingerprint_of_a_folder_is_stable_and_sees_weight_changes(tiny_pipeline_dir, tmp_path):
    first = model_fingerprint(tiny_pipeline_dir)
    assert first.startswith("sha256-quick:") and model_fingerprint(tiny_pipeline_dir) == first
    copy = shutil.copytree(tiny_pipeline_dir, tmp_path / "copy")
    assert model_fingerprint(copy) == first  # the location does not matter
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1
    save_file(state, str(weights), metadata={"format": "pt"})
    assert model_fingerprint(copy) != first


def test_fingerprint_of_hub_id_and_missing_path(tmp_path):
    assert model_fingerprint("owner/name") == "hub:owner/name"
    with pytest.raises(UserError, match="does not exist"):
        model_fingerprint(tmp_path / "missing.safetensors")
