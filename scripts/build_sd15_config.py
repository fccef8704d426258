"""Write configs/sd15/: the weight-free SD 1.5 diffusers folder for single-file checkpoints.

    python scripts/build_sd15_config.py [--out configs/sd15]

`StableDiffusionPipeline.from_single_file(ckpt, config="configs/sd15", local_files_only=True)`
reads the component configs and the tokenizer from this folder and the weights from the
checkpoint, so ChilloutMix-style files load with no hub access. The values are those of the
published stable-diffusion-v1-5 configs; the tokenizer is rebuilt from CLIP's BPE merges (see
sai_diffusion/miniature/clip_vocab.py). The safety checker and its feature extractor are left
out: from_single_file never loads a safety checker, and the pipeline runs without both.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import diffusers

from sai_diffusion.fsutil import write_json
from sai_diffusion.miniature import clip_vocab

REPO = Path(__file__).resolve().parents[1]  # the checkout whose configs/ this writes

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,  # diffusers' name for the number of heads in SD 1.x
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,  # CLIP ViT-L/14 text width
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,  # latent side: 512 px / 8
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TEXT_ENCODER = {  # CLIP ViT-L/14 text tower, as shipped with SD 1.5
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    # Published legacy ids: eos_token_id 2 makes CLIPTextModel pool at the argmax token id,
    # which is <|endoftext|> (49407, the largest id). SD uses the hidden states, not the pool.
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": clip_vocab.FULL_VOCAB_SIZE,
}

SCHEDULER = {  # PNDM with the scaled-linear betas SD 1.x was trained with
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    # PNDM ignores it; DDPM/DDIM built from this config must not clip latents to [-1, 1].
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def write_sd15_config(out_dir: Path) -> Path:
    """Write the folder to a temporary sibling, then swap it in: never a half-written folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"_diffusers_version": diffusers.__version__}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".sd15-") as tmp:
        staging = Path(tmp) / "sd15"
        write_json(staging / "model_index.json", {**MODEL_INDEX, **stamp}, sort_keys=True)
        write_json(staging / "unet" / "config.json", {**UNET, **stamp}, sort_keys=True)
        write_json(staging / "vae" / "config.json", {**VAE, **stamp}, sort_keys=True)
        write_json(staging / "text_encoder" / "config.json", TEXT_ENCODER, sort_keys=True)
        write_json(
            staging / "scheduler" / "scheduler_config.json", {**SCHEDULER, **stamp}, sort_keys=True
        )
        clip_vocab.write_tokenizer_files(staging / "tokenizer")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "configs" / "sd15")
    args = parser.parse_args()
    out = write_sd15_config(args.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
