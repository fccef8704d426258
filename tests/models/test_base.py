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
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sai_diffusion._resources import configs_dir, sd2_config_dir, sd15_config_dir, sdxl_config_dir
from sai_diffusion.config import TrainConfig
from sai_diffusion.errors import UserError
from sai_diffusion.files.ldm import layout_of_keys, save_single_file
from sai_diffusion.miniature.tiny import build_tiny_pipeline
from sai_diffusion.models.base import (
    load_base,
    load_base_model,
    model_fingerprint,
    prediction_note,
)
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
    ("key", "family", "lacking"),
    [
        (
            "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.bias",
            "SDXL",
            "conditioner.embedders.0.transformer.text_model.*",
        ),
        ("cond_stage_model.model.transformer.resblocks.0.ln_1.bias", "SD 2.x", None),
    ],
)
def test_incomplete_sdxl_and_sd2_files_are_named_as_such(key, family, lacking, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4), key: torch.zeros(4)}, str(path))
    message = _user_error(path)
    assert str(path) in message and f"complete {family} checkpoint" in message
    assert "first_stage_model.*" in message and (lacking is None or lacking in message)


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


# ------------------------------------------------------------------------------ SD 2.x, SDXL
FULL_SIZE = {  # published parameter counts (diffusers' models of the official weights)
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_config_folders_describe_the_published_models(family):
    """SD 2.1 (768-v): UNet 865.9 M, OpenCLIP ViT-H text tower cut to 23 blocks 340.4 M.
    SDXL base 1.0: UNet 2.567 B, CLIP ViT-L 123.1 M, OpenCLIP bigG with projection 694.7 M.
    Built on the meta device (no memory), counted exactly."""
    folder = {"sd2": sd2_config_dir(), "sdxl": sdxl_config_dir()}[family]
    assert folder.parent == configs_dir()
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if family == "sdxl":
            config_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            models["text_encoder_2"] = CLIPTextModelWithProjection(config_2)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == FULL_SIZE[family]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    index = json.loads((folder / "model_index.json").read_text())
    pad = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"]
    if family == "sd2":
        assert index["_class_name"] == "StableDiffusionPipeline"
        assert scheduler["_class_name"] == "DDIMScheduler"
        assert scheduler["prediction_type"] == "v_prediction"
        assert models["unet"].config.use_linear_projection and pad == "!"
        assert models["text_encoder"].config.hidden_act == "gelu"
    else:
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert index["force_zeros_for_empty_prompt"] is True
        assert scheduler["_class_name"] == "EulerDiscreteScheduler"
        assert models["unet"].config.projection_class_embeddings_input_dim == 1280 + 6 * 256
        assert models["vae"].config.scaling_factor == 0.13025 and pad == "<|endoftext|>"
        tokenizer_2 = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())
        assert tokenizer_2["pad_token"] == "!"
    for name in ("vocab.json", "merges.txt"):  # SD 1.5's BPE, byte for byte
        assert (folder / "tokenizer" / name).read_bytes() == (
            sd15_config_dir() / "tokenizer" / name
        ).read_bytes()


def test_sd2_and_sdxl_config_folders_are_what_the_build_script_writes(tmp_path):
    """Guards the committed folders against hand edits: rebuild and compare every file."""
    spec = importlib.util.spec_from_file_location(
        "build_sd2_sdxl", REPO_ROOT / "scripts" / "build_sd2_sdxl_configs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, built in module.write_family_configs(tmp_path).items():
        shipped = configs_dir() / name
        names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
        assert names == sorted(
            p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()
        )
        for file in names:
            a, b = (built / file).read_bytes(), (shipped / file).read_bytes()
            if file.endswith(".json"):
                a, b = json.loads(a), json.loads(b)
                for d in (a, b):
                    d.pop("_diffusers_version", None)
            assert a == b, f"{name}/{file}"


@pytest.fixture(scope="module")
def family_files(tiny_sd2_dir, tiny_sdxl_dir, tmp_path_factory):
    """The tiny SD 2.x and SDXL folders, each with its single file: {family: (dir, file)}."""
    root = tmp_path_factory.mktemp("family-files")
    out = {}
    for family, folder, cls in [
        ("sd2", tiny_sd2_dir, StableDiffusionPipeline),
        ("sdxl", tiny_sdxl_dir, StableDiffusionXLPipeline),
    ]:
        pipe = cls.from_pretrained(folder, local_files_only=True)
        out[family] = folder, save_single_file(pipe, root / f"{family}.safetensors")
    return out


def _assert_same_components(a, b) -> None:
    """UNet, VAE and each text encoder hold bit-identical tensors under the same names."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is None:
            assert getattr(b, name, None) is None, name
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def _unet_output(pipe) -> torch.Tensor:
    """One UNet call on fixed inputs (with SDXL's size conditioning when it has one)."""
    generator = torch.Generator().manual_seed(0)
    config = pipe.unet.config
    latents = torch.randn(1, 4, config.sample_size, config.sample_size, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    with torch.no_grad():
        return pipe.unet(latents, 500, context, **extra).sample


@pytest.mark.parametrize(
    ("family", "cls"), [("sd2", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)]
)
def test_sd2_and_sdxl_single_files_load_back_exactly(family, cls, family_files):
    """The file and its diffusers folder give the same tensors in every component and the
    same UNet output (exact: same weights, same float32 CPU kernels)."""
    folder, file = family_files[family]
    from_file = load_base_model(file, base_config=folder)
    from_folder = load_base_model(folder)
    assert type(from_file) is type(from_folder) is cls
    _assert_same_components(from_file, cls.from_pretrained(folder, local_files_only=True))
    _assert_same_components(from_folder, from_file)
    assert torch.equal(_unet_output(from_file), _unet_output(from_folder))
    assert from_file.tokenizer.pad_token == ("!" if family == "sd2" else "<|endoftext|>")
    if family == "sdxl":
        assert from_file.tokenizer_2.pad_token == "!"


def test_single_file_family_picks_its_shipped_config_folder(family_files, tiny_single_file):
    """Without base_config each tiny file is tried against its own family's full-size folder
    (a shape mismatch that names that folder); the key rule itself is exact."""
    for family, config in [("sd2", sd2_config_dir()), ("sdxl", sdxl_config_dir())]:
        file = family_files[family][1]
        with safe_open(str(file), framework="pt") as f:
            assert layout_of_keys(f.keys()) == family
        message = _user_error(file)
        assert str(file) in message and str(config) in message and "expected shape" in message
    with safe_open(str(tiny_single_file), framework="pt") as f:
        assert layout_of_keys(f.keys()) == "sd1"
    assert str(sd15_config_dir()) in _user_error(tiny_single_file)


def test_sdxl_file_with_an_sd_config_says_which_family_it_is(family_files, tiny_sd2_dir):
    file = family_files["sdxl"][1]
    message = _user_error(file, base_config=tiny_sd2_dir)
    assert str(file) in message and "SDXL checkpoint" in message
    assert "StableDiffusionPipeline" in message and "--base-config" in message


@pytest.mark.parametrize(
    "dropped",
    [
        "conditioner.embedders.1.model.ln_final.bias",  # text_encoder_2
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    ],
)
def test_sdxl_file_missing_a_text_encoder_weight_names_it(dropped, family_files, tmp_path):
    folder, file = family_files["sdxl"]
    state = load_file(str(file))
    del state[dropped]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    message = _user_error(partial, base_config=folder)
    assert str(partial) in message and "lacks 1" in message


def test_unsupported_pipeline_class_is_named(tiny_pipeline_dir, tmp_path):
    folder = _weight_free_copy(tiny_pipeline_dir, tmp_path / "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"})
    )
    message = _user_error(folder)
    assert str(folder) in message and "StableDiffusion3Pipeline" in message
    assert "StableDiffusionPipeline or StableDiffusionXLPipeline" in message


# ------------------------------------------------------------------------------ prediction type
def _with_tensors(file: Path, dest: Path, **extra: torch.Tensor) -> Path:
    save_file({**load_file(str(file)), **extra}, str(dest))
    return dest


def test_prediction_type_auto_follows_the_folder_and_the_setting_wins(family_files):
    folder = family_files["sd2"][0]
    auto = load_base_model(folder)
    assert auto.scheduler.config.prediction_type == "v_prediction"
    assert prediction_note(auto) == f"v_prediction (the scheduler config of {folder})"
    forced = load_base_model(folder, prediction_type="epsilon")
    assert type(forced.scheduler).__name__ == "DDIMScheduler"
    assert forced.scheduler.config.prediction_type == "epsilon"
    assert forced.sai_prediction_note == "epsilon (base.prediction_type)"
    with pytest.raises(UserError, match="prediction_type must be one of"):
        load_base_model(folder, prediction_type="sample")


def test_v_pred_marker_in_a_file_means_v_prediction_unless_overridden(
    family_files, tiny_pipeline_dir, tiny_single_file, tmp_path
):
    """ComfyUI's v_pred key makes an epsilon-configured SD 1.x file v-prediction; the
    setting still wins."""
    marked = _with_tensors(tiny_single_file, tmp_path / "v.safetensors", v_pred=torch.tensor([]))
    pipe = load_base_model(marked, base_config=tiny_pipeline_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the config's class, retyped
    assert pipe.sai_prediction_note == f"v_prediction (the v_pred marker in {marked})"
    pipe = load_base_model(marked, base_config=tiny_pipeline_dir, prediction_type="epsilon")
    assert pipe.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize(("scale", "expected"), [(0.5, "v_prediction"), (0.01, "epsilon")])
def test_sd2_file_prediction_from_its_weights(scale, expected, family_files, tmp_path):
    """ComfyUI's rule for SD 2.x: the spread of output_blocks.11's first norm bias (absent
    from the tiny UNet, so added here; the loader ignores it) decides, over the config."""
    folder, file = family_files["sd2"]
    probe = torch.randn(320, generator=torch.Generator().manual_seed(0)) * scale
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    probed = _with_tensors(file, tmp_path / "p.safetensors", **{key: probe})
    pipe = load_base_model(probed, base_config=folder)
    assert pipe.scheduler.config.prediction_type == expected
    assert "the weights of" in pipe.sai_prediction_note
    # without the probe the config folder (v_prediction) decides
    plain = load_base_model(file, base_config=folder)
    assert plain.sai_prediction_note.startswith("v_prediction (the scheduler config of")


def test_load_base_passes_the_prediction_setting(tiny_pipeline_dir):
    cfg = TrainConfig()
    cfg.base.model = str(tiny_pipeline_dir)
    cfg.base.prediction_type = "v_prediction"
    pipe = load_base(cfg)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
