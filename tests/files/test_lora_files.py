"""files.lora_files: the three LoRA files of a run, written and read back.

The reference for every file is the adapted in-memory model itself: a stock diffusers
pipeline that loads the file must compute the same UNet and text-encoder outputs (atol 1e-5,
fp32 on CPU). LoRA factors are set to random non-zero values with alpha != rank (UNet rank 4
alpha 1, text encoder rank 4 alpha 2), so a loader that assumes alpha = rank fails the check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from sai_diffusion.errors import UserError
from sai_diffusion.files.lora_files import (
    diffusers_key,
    dora_readers_note,
    parse_diffusers_key,
    save_embeddings,
    save_lora,
)
from sai_diffusion.models.inference import load_run
from sai_diffusion.models.lora import add_lora
from sai_diffusion.models.tokens import add_concept_tokens, make_token_embeddings_trainable
from tests.helpers import (
    ATOL,
    TOKEN,
    assert_outputs_close,
    load_pipe,
    lora_module_count,
    outputs,
)

# the run-folder contract, spelled as users read it
LORA_FILE, KOHYA_FILE, EMBEDDINGS_FILE = (
    "lora.safetensors", "lora_kohya.safetensors", "embeddings.safetensors"
)  # fmt: skip
RANK, ALPHA, TE_ALPHA = 4, 1.0, 2.0
METADATA = {
    "optimizer": "sgd-sai",
    "learning_rate": "0.1",
    "max_train_steps": "20",
    "resolution": "64",
    "sai_base_model_hash": "abc123",
}


def adapted_unet(base_dir: Path):
    unet = load_pipe(base_dir).unet
    add_lora(unet, rank=2, alpha=1)
    return unet


@dataclass
class Trained:
    run_dir: Path
    reference: dict  # outputs of the adapted in-memory model
    base: dict  # outputs with the concept token but no LoRA
    n_unet: int
    n_text: int


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir, tmp_path_factory) -> Trained:
    """A 'trained' run: token added, LoRA factors random, files saved."""
    pipe = load_pipe(tiny_pipeline_dir)
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [TOKEN], init_word="man",
                       init_noise_std=0.02, generator=torch.Generator().manual_seed(0))  # fmt: skip
    base = outputs(pipe)
    add_lora(pipe.unet, pipe.text_encoder, rank=RANK, alpha=ALPHA, text_encoder_alpha=TE_ALPHA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    reference = outputs(pipe)
    run_dir = tmp_path_factory.mktemp("run")
    save_lora(run_dir, unet=pipe.unet, text_encoder=pipe.text_encoder, rank=RANK, alpha=ALPHA,
              text_encoder_alpha=TE_ALPHA, metadata=METADATA)  # fmt: skip
    save_embeddings(run_dir / EMBEDDINGS_FILE, tokenizer=pipe.tokenizer,
                    text_encoder=pipe.text_encoder, tokens=[TOKEN])  # fmt: skip
    return Trained(run_dir, reference, base, *lora_module_count(pipe))


# ------------------------------------------------------------------ files: stock diffusers


def test_diffusers_file_and_embeddings_reload_in_a_stock_pipeline(tiny_pipeline_dir, trained):
    pipe = load_pipe(tiny_pipeline_dir)
    pipe.load_textual_inversion(str(trained.run_dir / EMBEDDINGS_FILE))  # token from the file
    pipe.load_lora_weights(trained.run_dir, weight_name=LORA_FILE)
    assert_outputs_close(outputs(pipe), trained.reference)
    # Sanity: the LoRA is far from a no-op, so matching it means alpha was honoured.
    assert (trained.reference["unet"] - trained.base["unet"]).abs().max() > 100 * ATOL


def test_diffusers_file_loads_at_the_trained_strength_with_its_header_ignored(
    tiny_pipeline_dir, trained, tmp_path
):
    """Guards a rank-4 alpha-1 LoRA loading 4x too strong (and the alpha-2 text encoder 2x)
    in loaders that ignore the header and take alpha = rank: ComfyUI reading diffusers keys,
    diffusers before its LoRA metadata. Two header-blind readings: the same tensors without
    any header through diffusers, and by hand, W + up @ down (no alpha) for one module."""
    blind = tmp_path / "blind"
    blind.mkdir()
    tensors = safetensors.torch.load_file(trained.run_dir / LORA_FILE)
    safetensors.torch.save_file(tensors, blind / LORA_FILE)  # no metadata at all
    pipe = load_pipe(tiny_pipeline_dir)
    pipe.load_textual_inversion(str(trained.run_dir / EMBEDDINGS_FILE))
    pipe.load_lora_weights(blind, weight_name=LORA_FILE)
    assert_outputs_close(outputs(pipe), trained.reference)

    kohya = safetensors.torch.load_file(trained.run_dir / KOHYA_FILE)
    for layer_key, kohya_key in [
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer",
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ]:  # fmt: skip
        blind_delta = tensors[f"{layer_key}.up.weight"] @ tensors[f"{layer_key}.down.weight"]
        rank = kohya[f"{kohya_key}.lora_down.weight"].shape[0]
        trained_delta = (kohya[f"{kohya_key}.alpha"] / rank) * (
            kohya[f"{kohya_key}.lora_up.weight"] @ kohya[f"{kohya_key}.lora_down.weight"]
        )
        torch.testing.assert_close(blind_delta, trained_delta, rtol=1e-6, atol=1e-7)


def test_kohya_file_loads_through_diffusers_kohya_converter_with_the_true_alpha(
    tiny_pipeline_dir, trained
):
    """Interop check: diffusers detects the kohya keys, reads each .alpha, and rebuilds the
    same model as from the diffusers file (guards convert_state_dict_to_kohya's alpha = rank)."""
    pipe = load_pipe(tiny_pipeline_dir)
    pipe.load_textual_inversion(str(trained.run_dir / EMBEDDINGS_FILE), token=TOKEN)
    pipe.load_lora_weights(trained.run_dir, weight_name=KOHYA_FILE)
    assert_outputs_close(outputs(pipe), trained.reference)


def test_file_keys_counts_and_alphas(trained):
    kohya = safetensors.torch.load_file(trained.run_dir / KOHYA_FILE)
    unet_keys = [k for k in kohya if k.startswith("lora_unet_")]
    te_keys = [k for k in kohya if k.startswith("lora_te_text_model_encoder_layers_")]
    assert len(unet_keys) == 3 * trained.n_unet and len(te_keys) == 3 * trained.n_text
    assert len(kohya) == len(unet_keys) + len(te_keys)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{q}.lora_down.weight"].shape[0] == RANK
    assert kohya[f"{q}.lora_up.weight"].shape[1] == RANK
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    alphas = {k: v for k, v in kohya.items() if k.endswith(".alpha")}
    assert all(v.ndim == 0 for v in alphas.values())
    assert {v.item() for k, v in alphas.items() if k.startswith("lora_unet_")} == {ALPHA}
    assert {v.item() for k, v in alphas.items() if k.startswith("lora_te_")} == {TE_ALPHA}

    diffusers = safetensors.torch.load_file(trained.run_dir / LORA_FILE)
    assert len(diffusers) == 2 * (trained.n_unet + trained.n_text)
    # the UNet's attention projections under their processors' names (ComfyUI's and
    # diffusers' common spelling: lora_files' docstring)
    attn1 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    assert {f"{attn1}.to_q_lora.down.weight", f"{attn1}.to_out_lora.up.weight"} <= set(diffusers)
    assert all(diffusers_key(*parse_diffusers_key(key)) == key for key in diffusers)
    assert parse_diffusers_key(f"{attn1}.to_out_lora.up.weight")[1].endswith("attn1.to_out.0")
    assert (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"
        in diffusers
    )

    embeddings = safetensors.torch.load_file(trained.run_dir / EMBEDDINGS_FILE)
    assert list(embeddings) == [TOKEN] and embeddings[TOKEN].shape == (1, 32)


def test_metadata_is_readable_from_the_headers(trained):
    with safetensors.safe_open(trained.run_dir / KOHYA_FILE, framework="pt") as f:
        kohya = f.metadata()
    assert METADATA.items() <= kohya.items()
    assert kohya["ss_network_dim"] == "4"
    # the UNet and text-encoder modules carry two alphas (1 and 2): the header claims neither
    assert "ss_network_alpha" not in kohya
    assert (kohya["sai_unet_alpha"], kohya["sai_text_encoder_alpha"]) == ("1.0", "2.0")
    assert kohya["ss_network_module"] == "networks.lora"
    assert kohya["ss_base_model_version"] == "sd_v1"
    assert kohya["ss_optimizer"] == "sgd-sai" and kohya["ss_learning_rate"] == "0.1"
    assert kohya["ss_max_train_steps"] == "20" and kohya["ss_resolution"] == "(64, 64)"

    with safetensors.safe_open(trained.run_dir / LORA_FILE, framework="pt") as f:
        header = f.metadata()
    assert METADATA.items() <= header.items()
    adapter = json.loads(header["lora_adapter_metadata"])
    # alpha / rank is folded into the up factors, so the file says alpha = rank
    assert adapter["unet.r"] == RANK and adapter["unet.lora_alpha"] == RANK
    assert adapter["text_encoder.lora_alpha"] == adapter["text_encoder.r"] == RANK
    assert header["sai_alpha_folded"] == "true" and "ss_network_alpha" not in header

    with safetensors.safe_open(trained.run_dir / EMBEDDINGS_FILE, framework="pt") as f:
        assert json.loads(f.metadata()["tokens"]) == [TOKEN]


# ------------------------------------------------- models.inference.load_run (the one loader)


def test_load_run_loads_at_the_given_weight(tiny_pipeline_dir, trained):
    pipe = load_pipe(tiny_pipeline_dir)
    load_run(pipe, trained.run_dir, adapter="potter")
    assert_outputs_close(outputs(pipe), trained.reference)

    pipe.set_adapters(["potter"], adapter_weights=[0.0])  # weight 0: the base model plus the token
    assert_outputs_close(outputs(pipe), trained.base)
    pipe.set_adapters(["potter"], adapter_weights=[0.5])
    half = outputs(pipe)

    other = load_pipe(tiny_pipeline_dir)
    load_run(other, trained.run_dir, weight=0.5)
    assert_outputs_close(outputs(other), half)

    with pytest.raises(UserError, match="lora.safetensors not found"):
        load_run(load_pipe(tiny_pipeline_dir), trained.run_dir.parent)


def test_load_run_reads_several_tokens(tiny_pipeline_dir, tmp_path):
    pipe = load_pipe(tiny_pipeline_dir)
    tokens = ["<a>", "<b>"]
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, tokens, init_word="man",
                       init_noise_std=0.1, generator=torch.Generator().manual_seed(3))  # fmt: skip
    add_lora(pipe.unet, None, rank=2, alpha=2)
    save_lora(tmp_path, unet=pipe.unet, rank=2, alpha=2, metadata={})
    save_embeddings(tmp_path / EMBEDDINGS_FILE, tokenizer=pipe.tokenizer,
                    text_encoder=pipe.text_encoder, tokens=tokens)  # fmt: skip
    want = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer.convert_tokens_to_ids(tokens)
    ]

    fresh = load_pipe(tiny_pipeline_dir)
    load_run(fresh, tmp_path)
    got = fresh.text_encoder.get_input_embeddings().weight[
        fresh.tokenizer.convert_tokens_to_ids(tokens)
    ]
    torch.testing.assert_close(got, want)


def test_save_embeddings_reads_trained_rows_through_the_token_wrapper(tiny_pipeline_dir, tmp_path):
    """Training keeps the concept rows in models.tokens.ConceptTokenEmbedding, outside .weight."""
    pipe = load_pipe(tiny_pipeline_dir)
    (token_id,) = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [TOKEN], init_word="man")
    wrapper = make_token_embeddings_trainable(pipe.text_encoder, [token_id])
    with torch.no_grad():
        wrapper.vectors.fill_(0.5)
    save_embeddings(tmp_path / EMBEDDINGS_FILE, tokenizer=pipe.tokenizer,
                    text_encoder=pipe.text_encoder, tokens=[TOKEN])  # fmt: skip
    saved = safetensors.torch.load_file(tmp_path / EMBEDDINGS_FILE)[TOKEN]
    torch.testing.assert_close(saved, torch.full((1, 32), 0.5))


# ---------------------------------------------------------------------- safety of writing


def test_files_are_written_atomically(tiny_pipeline_dir, trained, monkeypatch, tmp_path):
    assert sorted(p.name for p in trained.run_dir.iterdir()) == sorted(
        [LORA_FILE, KOHYA_FILE, EMBEDDINGS_FILE]
    )  # no temporary names left behind

    # A crash at the rename keeps the previous file whole and removes the temporary one.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (LORA_FILE, KOHYA_FILE, EMBEDDINGS_FILE):
        (run_dir / name).write_bytes((trained.run_dir / name).read_bytes())
    before = (run_dir / LORA_FILE).read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    unet = adapted_unet(tiny_pipeline_dir)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora(run_dir, unet=unet, rank=2, alpha=1, metadata={})
    monkeypatch.undo()
    assert (run_dir / LORA_FILE).read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [LORA_FILE, KOHYA_FILE, EMBEDDINGS_FILE]
    )


def test_save_lora_refuses_an_alpha_that_would_mis_scale_the_files(tiny_pipeline_dir, tmp_path):
    unet = adapted_unet(tiny_pipeline_dir)  # rank 2, alpha 1
    with pytest.raises(ValueError, match="alpha"):
        save_lora(tmp_path, unet=unet, rank=2, alpha=2, metadata={})
    with pytest.raises(TypeError, match="str to str"):
        save_lora(tmp_path, unet=unet, rank=2, alpha=1, metadata={"max_train_steps": 20})
    assert list(tmp_path.iterdir()) == []


def test_the_dora_note_names_every_tool_of_the_table_and_the_file_each_reads_right():
    """A DoRA run prints it once (training.recipe); its facts are docs/file-formats.md's
    measured DoRA rows."""
    note = dora_readers_note("sd1")
    right, wrong = note.split("\n  wrong:")
    assert "lora_kohya.safetensors in ComfyUI and Forge" in right and "load_run" in right
    for tool in ("diffusers 0.42", "ComfyUI, lora.safetensors", "kohya sd-scripts", "A1111",
                 "LyCORIS", "Forge, lora.safetensors"):  # fmt: skip
        assert tool in wrong, tool
    assert "not measured" not in note
    assert "text encoders' DoRA" in dora_readers_note("sdxl")
    with pytest.raises(ValueError, match="sd1, sd2 or sdxl"):
        dora_readers_note("flux")
