"""Tiny SD-1.5-architecture pipelines, the CLIP vocabulary they use and the single-file layout."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from transformers import CLIPTokenizer

from sai_diffusion import clip_vocab
from sai_diffusion._resources import sd15_config_dir
from sai_diffusion.errors import UserError
from sai_diffusion.ldm_format import unet_to_ldm, vae_to_ldm
from sai_diffusion.tiny import build_tiny_pipeline, save_single_file

# SD 1.5 / OpenAI CLIP ids, as published with the model (tokenizer of openai/clip-vit-large-patch14).
SD15_A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def _assert_same_weights(a: StableDiffusionPipeline, b: StableDiffusionPipeline) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = _state(getattr(a, name)), _state(getattr(b, name))
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


# ------------------------------------------------------------------------------ vocabulary
def test_shipped_sd15_tokenizer_has_sd15_ids():
    tok = CLIPTokenizer.from_pretrained(sd15_config_dir() / "tokenizer")
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == SD15_A_PHOTO_OF_A_CAT
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_shipped_tokenizer_is_what_clip_anytorch_builds(tmp_path):
    """Guards configs/sd15/tokenizer against drifting from the BPE file it is built from."""
    if clip_vocab.clip_bpe_file() is None:
        pytest.skip("clip-anytorch not installed (pip install --no-deps clip-anytorch)")
    built = clip_vocab.write_tokenizer_files(tmp_path)
    shipped = sd15_config_dir() / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (built / name).read_bytes() == (shipped / name).read_bytes(), name


def test_small_vocab_is_a_consistent_prefix_of_the_full_one():
    full = clip_vocab.build_vocab(clip_vocab.load_merges())
    merges = clip_vocab.load_merges(1000)
    small = clip_vocab.build_vocab(merges)
    assert len(full) == clip_vocab.FULL_VOCAB_SIZE == 49408
    assert len(small) == 514 + 1000
    assert small["<|startoftext|>"] == 1512 and small["<|endoftext|>"] == 1513
    for token, i in small.items():
        if i < 1512:
            assert full[token] == i, token
    # every merge joins two symbols the vocabulary already has, so BPE never leaves it
    for merge in merges:
        left, right = merge.split(" ")
        assert left in small and right in small and left + right in small


def test_small_tokenizer_tokenises_english_with_sd15_ids(tmp_path):
    tok = CLIPTokenizer.from_pretrained(clip_vocab.write_tokenizer_files(tmp_path, num_merges=4000))
    assert len(tok) == 4514
    ids = tok("a photo of a cat").input_ids
    assert ids == [4512, *SD15_A_PHOTO_OF_A_CAT[1:-1], 4513]


def test_no_merges_gives_a_header_only_merges_file(tmp_path):
    out = clip_vocab.write_tokenizer_files(tmp_path, num_merges=0)
    assert (out / "merges.txt").read_text() == "#version: 0.2\n"
    tok = CLIPTokenizer.from_pretrained(out)
    assert len(tok) == 514
    assert tok.convert_ids_to_tokens(tok("cat").input_ids) == [
        "<|startoftext|>", "c", "a", "t</w>", "<|endoftext|>"
    ]  # fmt: skip


def test_missing_clip_anytorch_names_the_install_command(monkeypatch):
    monkeypatch.setattr(clip_vocab, "clip_bpe_file", lambda: None)
    monkeypatch.setattr(clip_vocab, "_shipped_merges_file", lambda: None)
    with pytest.raises(UserError, match=r"pip install --no-deps clip-anytorch"):
        clip_vocab.load_merges(10)


def test_without_clip_anytorch_the_shipped_merges_are_used(monkeypatch):
    if clip_vocab.clip_bpe_file() is None:
        pytest.skip("clip-anytorch not installed: nothing to compare the fallback with")
    expected = clip_vocab.load_merges(2000)
    monkeypatch.setattr(clip_vocab, "clip_bpe_file", lambda: None)
    assert clip_vocab.load_merges(2000) == expected


def test_num_merges_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="num_merges"):
        clip_vocab.load_merges(clip_vocab.FULL_NUM_MERGES + 1)


# ------------------------------------------------------------------------------ tiny model
def test_tiny_pipeline_is_deterministic_by_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_pipeline(seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    _assert_same_weights(a, build_tiny_pipeline(seed=0))
    b = build_tiny_pipeline(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_tiny_pipeline_options():
    pipe = build_tiny_pipeline(unet_channels=(16, 32, 32), scheduler="ddpm", num_merges=100)
    assert list(pipe.unet.config.down_block_types) == [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
    ]  # fmt: skip
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.scheduler.config.clip_sample is False  # SD 1.5's schedule, latents unclipped
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 614
    with pytest.raises(ValueError, match="scheduler"):
        build_tiny_pipeline(scheduler="euler")


def test_tiny_pipeline_has_sd15_structure(tiny_pipeline_dir):
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    unet, text = pipe.unet.config, pipe.text_encoder.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(unet.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert unet.cross_attention_dim == text.hidden_size == 32
    assert text.num_hidden_layers == 5 and text.vocab_size == len(pipe.tokenizer)
    assert text.max_position_embeddings == pipe.tokenizer.model_max_length == 77
    assert text.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.vae.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    assert pipe.safety_checker is None
    # everyday prompt words are single tokens
    words = pipe.tokenizer.tokenize("a pencil sketch of a man holding a wand")
    assert "sketch</w>" in words and "holding</w>" in words


def test_tiny_pipeline_samples_64px_images(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a pencil sketch of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    image = out.images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all() and (image <= 1).all())


# ------------------------------------------------------------------------------ single file
def test_single_file_round_trip_is_exact(tiny_pipeline_dir, tiny_single_file):
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(
        str(tiny_single_file), config=str(tiny_pipeline_dir), local_files_only=True
    )
    _assert_same_weights(original, loaded)


def test_single_file_uses_the_original_sd_layout(tiny_single_file):
    with safe_open(str(tiny_single_file), framework="pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    prefixes = (
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.transformer.text_model.",
    )
    assert all(k.startswith(prefixes) for k in keys)
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after a plain level
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in keys, key
    assert len(q_shape) == 4  # LDM's VAE attention is a 1x1 convolution


def test_save_single_file_fp16_and_atomic(tmp_path, tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(pipe, tmp_path / "x.ckpt")


def test_ldm_names_of_full_size_sd15_invert_diffusers_own_conversion():
    """Full-size SD 1.5 UNet and VAE on the meta device (no memory): our names fed to
    diffusers' LDM->diffusers converters give back exactly the model's own names and shapes,
    and diffusers recognises the layout as SD v1."""
    config_dir = sd15_config_dir()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_dir / "unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    ldm_unet, ldm_vae = unet_to_ldm(unet), vae_to_ldm(vae)
    assert len(ldm_unet) == 686 and len(ldm_vae) == 248  # key counts of the SD 1.5 checkpoint
    assert infer_diffusers_model_type({**ldm_unet, **ldm_vae}) == "v1"
    for model, ldm, convert in [
        (unet, ldm_unet, convert_ldm_unet_checkpoint),
        (vae, ldm_vae, convert_ldm_vae_checkpoint),
    ]:
        back = convert(ldm, dict(model.config))
        own = model.state_dict()
        assert back.keys() == own.keys()
        assert all(back[k].shape == own[k].shape for k in own)
