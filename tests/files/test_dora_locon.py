"""DoRA and LoCon (issue 18) in the run's files: LoRA on the ResNet convs, DoRA's magnitudes,
written so that stock diffusers (lora.safetensors) and ComfyUI (lora_kohya.safetensors, read
here by a re-implementation of its key map and weight rules) rebuild the trained model.

ComfyUI's rules, from comfy/lora.py and comfy/weight_adapter (read for this test): a UNet
module with a weight, diffusers name n, answers to ``lora_unet_`` + n with dots as
underscores; a CLIP layer b's six projections (self_attn.{q,k,v,out}_proj, mlp.fc1/2) answer to
``lora_te_text_model_encoder_layers_<b>_<name>``. A key's delta is
alpha / rank * up.flatten(1) @ down.flatten(1), reshaped to the weight; with a ``dora_scale``
whose first dimension is the output's, the merged weight is (W + delta) * dora_scale /
(|W| + eps), |W| the base weight's row norms.

ComfyUI's diffusers-key map (comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip``
at Comfy-Org/ComfyUI a125cd84b054, v0.3.64; its loader comfy/weight_adapter/lora.py
``LoRAAdapter.load``): a UNet weight w of comfy/utils.py ``unet_to_diffusers``' table answers
to ``unet.`` + w's layer name with ``.to_`` written ``.processor.to_`` and a final
``.to_out.0`` cut to ``.to_out``; CLIP layer b's six projections to
``text_encoder.text_model.encoder.layers.<b>.<name>``. A layer x is read from
``x.lora_up.weight``, ``x_lora.up.weight``, ``x.lora_B.weight``, ``x.lora.up.weight`` or
``x.lora_linear_layer.up.weight`` (and the matching down), with ``x.alpha`` if present, else
scale 1; any other key is "lora key not loaded" (DoRA's ``lora_magnitude_vector`` among them).

kohya sd-scripts (networks/lora.py at 48d368fa5577, ``create_network_from_weights`` and
``LoRAInfModule.merge_to``): one module per ``lora_down`` key, scale ``alpha / dim`` from its
``.alpha``; merge W + scale * up @ down (a 3x3 conv through conv2d, the same product). Only
``lora_up.weight`` and ``lora_down.weight`` are read: a ``dora_scale`` is never looked at, and
``load_weights`` lists it among the unexpected keys without a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from sai_diffusion.files.lora_files import save_lora
from sai_diffusion.models.inference import load_run
from sai_diffusion.models.lora import add_lora
from tests.files.test_sdxl_files import _comfy_unet_config, _comfy_unet_to_diffusers
from tests.helpers import assert_outputs_close, load_pipe, outputs

LOCON = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in")
RANK, ALPHA, TE_ALPHA = 4, 1.0, 2.0
CLIP_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "mlp.fc1", "mlp.fc2")  # fmt: skip


@dataclass
class Saved:
    run_dir: Path
    reference: dict
    dora: bool


@pytest.fixture(scope="module", params=[False, True], ids=["locon", "locon+dora"])
def saved(request, tiny_pipeline_dir, tmp_path_factory) -> Saved:
    """LoRA on the attention projections, the ResNet convs and proj_in, and on the text
    encoder; factors random, DoRA magnitudes moved off their initial norms; files saved."""
    pipe = load_pipe(tiny_pipeline_dir)
    add_lora(pipe.unet, pipe.text_encoder, rank=RANK, alpha=ALPHA, unet_targets=LOCON,
             text_encoder_alpha=TE_ALPHA, use_dora=request.param)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    run_dir = tmp_path_factory.mktemp("locon")
    save_lora(run_dir, unet=pipe.unet, text_encoder=pipe.text_encoder, rank=RANK, alpha=ALPHA,
              text_encoder_alpha=TE_ALPHA, metadata={})  # fmt: skip
    return Saved(run_dir, outputs(pipe), request.param)


def _comfy_key_map(pipe) -> dict[str, tuple[torch.nn.Module, str]]:
    """ComfyUI's names for SD 1.5 LoRA keys -> (model, module name)."""
    keys = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            keys["lora_unet_" + name.replace(".", "_")] = (pipe.unet, name)
    for b in range(pipe.text_encoder.config.num_hidden_layers):
        for name in CLIP_NAMES:
            key = f"lora_te_text_model_encoder_layers_{b}_{name.replace('.', '_')}"
            keys[key] = (pipe.text_encoder, f"encoder.layers.{b}.{name}")
    return keys


@torch.no_grad()
def _merge_as_comfyui(pipe, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Merge a kohya file into the pipeline's weights by ComfyUI's rules; returns the keys
    it read."""
    key_map, used = _comfy_key_map(pipe), set()
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        model, name = key_map[base]  # a KeyError is ComfyUI's "lora key not loaded"
        weight = model.get_submodule(name).weight
        down, up = tensors[key], tensors[f"{base}.lora_up.weight"]
        alpha = tensors[f"{base}.alpha"].item() / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha
        merged = weight + delta
        used |= {key, f"{base}.lora_up.weight", f"{base}.alpha"}
        if f"{base}.dora_scale" in tensors:
            scale = tensors[f"{base}.dora_scale"]
            assert scale.shape[0] == weight.shape[0]  # the output-axis reading
            norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
            merged = merged * (scale / (norm + torch.finfo(weight.dtype).eps))
            used.add(f"{base}.dora_scale")
        weight.copy_(merged)
    return used


def test_the_kohya_file_rebuilds_the_model_by_comfyuis_rules(tiny_pipeline_dir, saved):
    tensors = safetensors.torch.load_file(saved.run_dir / "lora_kohya.safetensors")
    assert any("_resnets_0_conv1." in k and tensors[k].dim() == 4 for k in tensors)  # LoCon
    assert any(k.endswith(".dora_scale") for k in tensors) == saved.dora
    pipe = load_pipe(tiny_pipeline_dir)
    before = outputs(pipe)
    used = _merge_as_comfyui(pipe, tensors)
    assert used == set(tensors)  # every key is one ComfyUI loads
    assert_outputs_close(outputs(pipe), saved.reference, atol=2e-5)
    assert (before["unet"] - saved.reference["unet"]).abs().max() > 1e-2  # not a no-op
    if not saved.dora:  # diffusers' kohya converter reads LoCon too (it drops dora_scale keys)
        pipe = load_pipe(tiny_pipeline_dir)
        pipe.load_lora_weights(saved.run_dir, weight_name="lora_kohya.safetensors")
        assert_outputs_close(outputs(pipe), saved.reference)


def test_the_diffusers_file_loads_in_stock_diffusers_and_through_load_run(tiny_pipeline_dir, saved):
    pipe = load_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(saved.run_dir, weight_name="lora.safetensors")
    got = outputs(pipe)
    assert_outputs_close({"unet": got["unet"]}, {"unet": saved.reference["unet"]})
    if not saved.dora:  # diffusers 0.42 drops the text encoder's DoRA magnitudes (docstring)
        assert_outputs_close(got, saved.reference)
    pipe = load_pipe(tiny_pipeline_dir)
    load_run(pipe, saved.run_dir)  # restores them
    assert_outputs_close(outputs(pipe), saved.reference)


def test_the_kohya_header_names_the_conv_settings_and_the_dora_reading(saved):
    with safetensors.safe_open(saved.run_dir / "lora_kohya.safetensors", framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}
    assert header["ss_network_module"] == "networks.lora"  # not LyCORIS: see _network_args
    assert ("ComfyUI" in header.get("sai_dora_scale", "")) == saved.dora


# --------------------------------------------------- lora.safetensors by ComfyUI's key map


def _comfy_diffusers_key_map(pipe) -> dict[str, tuple[torch.nn.Module, str]]:
    """ComfyUI's names for diffusers-style SD 1.5 LoRA keys -> (model, module name)."""
    keys = {}
    for name in _comfy_unet_to_diffusers(_comfy_unet_config(pipe.unet.config)):
        key = "unet." + name.replace(".to_", ".processor.to_")
        keys[key.removesuffix(".0") if key.endswith(".to_out.0") else key] = (pipe.unet, name)
    for b in range(pipe.text_encoder.config.num_hidden_layers):
        for name in CLIP_NAMES:
            keys[f"text_encoder.text_model.encoder.layers.{b}.{name}"] = (
                pipe.text_encoder, f"encoder.layers.{b}.{name}"
            )  # fmt: skip
    return keys


_COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))  # fmt: skip


@torch.no_grad()
def _merge_diffusers_keys_as_comfyui(pipe, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Merge a diffusers-keys file by ComfyUI's rules; returns the keys it read."""
    used = set()
    for key, (model, name) in _comfy_diffusers_key_map(pipe).items():
        for up_suffix, down_suffix in _COMFY_PAIRS:
            if key + up_suffix in tensors:
                up, down = tensors[key + up_suffix], tensors[key + down_suffix]
                scale = 1.0  # no .alpha key: ComfyUI's alpha is None, its scale 1
                if f"{key}.alpha" in tensors:
                    scale = tensors[f"{key}.alpha"].item() / down.shape[0]
                    used.add(f"{key}.alpha")
                weight = model.get_submodule(name).weight
                weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
                used |= {key + up_suffix, key + down_suffix}
                break
    return used


def test_comfyui_maps_every_lora_key_of_the_diffusers_file_but_doras_magnitudes(
    tiny_pipeline_dir, saved
):
    """Guards issue 31: ComfyUI skipped the UNet's attention LoRA of lora.safetensors (peft's
    ``to_q.lora_A`` and diffusers' ``to_q.lora.down`` names are not in its key map). Merged by
    its rules, the plain LoCon file gives the trained model (atol 2e-5: a merged weight sums in
    another order than peft's layers); a DoRA file leaves exactly its magnitudes unread, so
    ComfyUI computes plain LoRA from it (use the kohya file there)."""
    tensors = safetensors.torch.load_file(saved.run_dir / "lora.safetensors")
    pipe = load_pipe(tiny_pipeline_dir)
    before = outputs(pipe)
    used = _merge_diffusers_keys_as_comfyui(pipe, tensors)
    magnitudes = {k for k in tensors if k.endswith(".lora_magnitude_vector")}
    assert set(tensors) - used == magnitudes and bool(magnitudes) == saved.dora
    assert any(".processor.to_out_lora." in k for k in used)  # the attention projections
    assert any("_resnets_0_conv1" in k.replace(".", "_") for k in used)  # and LoCon's convs
    if not saved.dora:
        assert_outputs_close(outputs(pipe), saved.reference, atol=2e-5)
        assert (before["unet"] - saved.reference["unet"]).abs().max() > 1e-2  # not a no-op
    # the spellings the file used before: not in ComfyUI's map for the attention layers
    for old in (".lora_A.weight", ".lora.down.weight"):
        renamed = {_old_name(k, old): v for k, v in tensors.items()}
        left = set(renamed) - _merge_diffusers_keys_as_comfyui(load_pipe(tiny_pipeline_dir),
                                                               renamed)  # fmt: skip
        assert {k for k in left if ".attn1.to_q." in k}, old


def _old_name(key: str, down: str) -> str:
    """``key`` as peft (``.lora_A.weight``) or diffusers' converter (``.lora.down.weight``)
    spelled an attention projection's factors: ``...attn1.to_out.0.lora_A.weight``."""
    up = down.replace("lora_A", "lora_B").replace("down", "up")
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        layer = f"{proj}.0" if proj == "to_out" else proj
        key = key.replace(f".processor.{proj}_lora.down.weight", f".{layer}{down}")
        key = key.replace(f".processor.{proj}_lora.up.weight", f".{layer}{up}")
    return key


# --------------------------------------------------- the DoRA kohya file in kohya sd-scripts


@torch.no_grad()
def _merge_as_kohya(pipe, tensors: dict[str, torch.Tensor]) -> set[str]:
    """kohya sd-scripts' merge (module docstring) of a kohya file; returns the keys read."""
    modules = dict(_comfy_key_map(pipe))  # kohya names its SD 1.5 layers the same way
    used = set()
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key.removesuffix(".lora_down.weight")
        model, name = modules[base]
        weight = model.get_submodule(name).weight
        down, up = tensors[key], tensors[f"{base}.lora_up.weight"]
        scale = tensors[f"{base}.alpha"].item() / down.shape[0]
        weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        used |= {key, f"{base}.lora_up.weight", f"{base}.alpha"}
    return used


def test_kohya_sd_scripts_merges_the_kohya_file_and_never_reads_dora_scale(
    tiny_pipeline_dir, saved
):
    """kohya's merge of the plain LoCon file is the trained model (atol 2e-5). What a kohya
    user gets from a DoRA run's file: every ``dora_scale`` left unread, without a word, and
    the LoRA merged as plain LoRA, the model stock diffusers builds from the same file (it
    drops ``dora_scale``), not the trained one."""
    tensors = safetensors.torch.load_file(saved.run_dir / "lora_kohya.safetensors")
    pipe = load_pipe(tiny_pipeline_dir)
    used = _merge_as_kohya(pipe, tensors)
    scales = {k for k in tensors if k.endswith(".dora_scale")}
    assert set(tensors) - used == scales and bool(scales) == saved.dora
    got = outputs(pipe)
    if not saved.dora:
        assert_outputs_close(got, saved.reference, atol=2e-5)
        return
    plain = load_pipe(tiny_pipeline_dir)
    plain.load_lora_weights(saved.run_dir, weight_name="lora_kohya.safetensors")
    assert_outputs_close(got, outputs(plain), atol=2e-5)
    assert (got["unet"] - saved.reference["unet"]).abs().max() > 1e-2  # not the trained model
