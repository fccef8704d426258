"""Write configs/sd2/ and configs/sdxl/: the weight-free SD 2.1 and SDXL base 1.0 diffusers
folders for single-file checkpoints of those families.

    python scripts/build_sd2_sdxl_configs.py [--out configs]

Values are those of the published stabilityai/stable-diffusion-2-1 (768-v) and
stabilityai/stable-diffusion-xl-base-1.0 configs, with two deliberate differences: no safety
checker or feature extractor (as configs/sd15), and ``torch_dtype`` float32 in the text
encoder configs (the folders hold no weights; the dtype is chosen at load time). Parts that
are the same as SD 1.5's (the VAE, CLIP ViT-L, the BPE vocabulary) are read from the shipped
configs/sd15, so they cannot drift apart. Run scripts/build_sd15_config.py first when that
folder is missing.

The tokenizers differ from SD 1.5's only in padding: SD 2.x's OpenCLIP tokenizer and SDXL's
second one pad with "!" (id 0), not with <|endoftext|>.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import diffusers

from sai_diffusion.fsutil import write_json

REPO = Path(__file__).resolve().parents[1]  # the checkout whose configs/ this writes
SD15 = REPO / "configs" / "sd15"

_CROSS_ATTENTION_SD = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]

SD2_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD2_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],  # heads per level (64 channels each)
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,  # OpenCLIP ViT-H text width
    "down_block_types": _CROSS_ATTENTION_SD,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,  # latent side: 768 px / 8
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "upcast_attention": True,  # fp16 attention overflows in the 768-v model without it
    "use_linear_projection": True,  # proj_in/proj_out are Linear, not 1x1 convolutions
}

SD2_TEXT_ENCODER = {  # OpenCLIP ViT-H/14 text tower as diffusers converts it
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",  # OpenCLIP's exact GELU (OpenAI CLIP uses quick_gelu)
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    # ViT-H's text tower has 24 blocks; SD 2 conditions on the penultimate one's output, so
    # the converted model keeps 23 (its final_layer_norm then applies to block 23's output).
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

SD2_SCHEDULER = {  # the 768-v model predicts v (Salimans & Ho 2022), not the noise
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "add_watermarker": None,
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    # Micro-conditioning: the pooled text embedding (1280) plus six sizes (original h/w, crop
    # top/left, target h/w), each a 256-d sinusoidal embedding: 1280 + 6 * 256 = 2816.
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) and OpenCLIP bigG (1280) side by side
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,  # latent side: 1024 px / 8
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],  # the mid block takes the last: 10
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14 text tower with its projection
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _sd15(component: str, filename: str = "config.json") -> dict:
    return json.loads((SD15 / component / filename).read_text(encoding="utf-8"))


def _sd15_vae(**changes) -> dict:
    vae = {k: v for k, v in _sd15("vae").items() if k != "_diffusers_version"}
    return {**vae, **changes}


def _write_tokenizer(out_dir: Path, *, pad_token: str) -> None:
    """SD 1.5's CLIP BPE files with ``pad_token`` in place of its <|endoftext|> padding."""
    out_dir.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(SD15 / "tokenizer" / name, out_dir / name)
    special = {**_sd15("tokenizer", "special_tokens_map.json"), "pad_token": pad_token}
    config = {**_sd15("tokenizer", "tokenizer_config.json"), "pad_token": pad_token}
    write_json(out_dir / "tokenizer_config.json", config, sort_keys=True)
    write_json(out_dir / "special_tokens_map.json", special, sort_keys=True)


def _write_sd2(folder: Path, stamp: dict) -> None:
    write_json(folder / "model_index.json", {**SD2_MODEL_INDEX, **stamp}, sort_keys=True)
    write_json(folder / "unet" / "config.json", {**SD2_UNET, **stamp}, sort_keys=True)
    write_json(folder / "vae" / "config.json", _sd15_vae(sample_size=768, **stamp), sort_keys=True)
    write_json(folder / "text_encoder" / "config.json", SD2_TEXT_ENCODER, sort_keys=True)
    write_json(
        folder / "scheduler" / "scheduler_config.json", {**SD2_SCHEDULER, **stamp}, sort_keys=True
    )
    _write_tokenizer(folder / "tokenizer", pad_token="!")


def _write_sdxl(folder: Path, stamp: dict) -> None:
    write_json(folder / "model_index.json", {**SDXL_MODEL_INDEX, **stamp}, sort_keys=True)
    write_json(folder / "unet" / "config.json", {**SDXL_UNET, **stamp}, sort_keys=True)
    # SDXL's retrained VAE: same architecture, new latent scale, overflows in fp16.
    vae = _sd15_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **stamp)
    write_json(folder / "vae" / "config.json", vae, sort_keys=True)
    write_json(folder / "text_encoder" / "config.json", _sd15("text_encoder"), sort_keys=True)
    write_json(folder / "text_encoder_2" / "config.json", SDXL_TEXT_ENCODER_2, sort_keys=True)
    write_json(
        folder / "scheduler" / "scheduler_config.json", {**SDXL_SCHEDULER, **stamp}, sort_keys=True
    )
    _write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    _write_tokenizer(folder / "tokenizer_2", pad_token="!")


WRITERS = {"sd2": _write_sd2, "sdxl": _write_sdxl}


def write_family_configs(out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/sd2`` and ``out_dir/sdxl``; each goes to a temporary sibling first and
    is swapped in whole, so a folder is never half-written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = {"_diffusers_version": diffusers.__version__}
    written = {}
    for name, writer in WRITERS.items():
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
            staging = Path(tmp) / name
            writer(staging, stamp)
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        written[name] = target
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "configs")
    args = parser.parse_args()
    for folder in write_family_configs(args.out).values():
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"wrote {folder} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
