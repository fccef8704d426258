"""models.lora.add_lora: peft LoRA on the UNet and text encoder of a real tiny pipeline."""

from __future__ import annotations

import pytest

from sai_diffusion.errors import UserError
from sai_diffusion.models.lora import add_lora
from tests.helpers import assert_outputs_close, load_pipe, lora_module_count, outputs

RANK, ALPHA = 4, 1.0


def test_add_lora_trains_only_lora_and_starts_as_the_base_model(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    before = outputs(pipe)
    add_lora(pipe.unet, pipe.text_encoder, rank=RANK, alpha=ALPHA)

    for model in (pipe.unet, pipe.text_encoder):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert all(not p.any() for n, p in model.named_parameters() if ".lora_B." in n)
        assert set(model.peft_config) == {"default"}
    n_unet, n_text = lora_module_count(pipe)
    assert sum(".lora_A." in n for n, _ in pipe.unet.named_parameters()) == n_unet
    assert sum(".lora_A." in n for n, _ in pipe.text_encoder.named_parameters()) == n_text
    # B = 0: the adapted model computes exactly what the base model computes.
    assert_outputs_close(outputs(pipe), before, atol=0.0)


def test_add_lora_unknown_target_names_the_available_ones_and_changes_nothing(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    with pytest.raises(UserError, match=r"'to_qq'.*to_q.*to_out\.0"):
        add_lora(pipe.unet, pipe.text_encoder, rank=RANK, alpha=ALPHA, unet_targets=("to_qq",))
    with pytest.raises(UserError, match=r"'query'.*q_proj"):
        add_lora(pipe.unet, pipe.text_encoder, rank=RANK, alpha=ALPHA,
                 text_encoder_targets=("query",))  # fmt: skip
    assert not hasattr(pipe.unet, "peft_config")
    assert any(p.requires_grad for p in pipe.unet.parameters())
