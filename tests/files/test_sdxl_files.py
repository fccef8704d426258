"""SDXL and SD 2.x runs' files (lora_kohya, lora, embeddings) as ComfyUI, kohya sd-scripts,
A1111 and stock diffusers read them. Three tiny runs (SDXL, SDXL DoRA, SD 2.x) are trained once
per module through the recipe; the reference is each trained model as it is in memory. Each
client's rules are re-implemented here from its code, read for this test:

ComfyUI: comfy/lora.py at 41444b5236c6 (model_lora_keys_clip, model_lora_keys_unet),
comfy/utils.py at 2ba5cc8b867b (unet_to_diffusers), sdxl_clip.py at 565d67478aea and
sd2_clip.py at 01312a55a435 (the encoders' names). A kohya UNet key is ``lora_unet_`` + a
diffusers weight name of unet_to_diffusers' table (dots as underscores; the LDM name works
too), which sends it to the LDM weight that table names: input_blocks.{1 + (res + 1) * level
+ i}, middle_block.1, output_blocks.{(res + 1) * level + i} (up levels counted from the lowest
resolution). For each CLIP layer b < 32 and projection p of self_attn.{q,k,v,out}_proj,
mlp.fc{1,2}: SDXL's CLIP-L (clip_l) answers to ``lora_te1_text_model_encoder_layers_<b>_<p>``,
its OpenCLIP-bigG (clip_g) to ``lora_te2_...``; SD 2.x's one OpenCLIP-H encoder is clip_h,
answering to ``lora_te_...`` (and lora_te1_). Any other key is logged "lora key not loaded".
Merge: W += alpha / rank * up.flatten(1) @ down.flatten(1); with an output-axis
``dora_scale`` s (comfy/weight_adapter/base.py at 9c0cf36cd796), W' = (W + dW) * s / (|W| +
eps), |W| the base rows' norms. sd1_clip.load_embed reads an SDXL embedding's ``clip_l`` and
``clip_g`` tensors by name.

kohya sd-scripts at 48d368fa5577, networks/lora.py: LoRA goes on the Linear and 1x1 Conv2d
children of every Transformer2DModel (UNet) and of every CLIPAttention, CLIPSdpaAttention and
CLIPMLP (text encoders), named prefix + "." + module path, dots as underscores; prefixes
lora_unet, lora_te (one encoder), lora_te1 / lora_te2 (SDXL's two). SDXL's UNet is kohya's
own SdxlUNet2DConditionModel, whose names are the SAI checkpoint's (input_blocks...):
create_network_from_weights first renames a file's diffusers UNet keys by
convert_diffusers_to_sai_if_needed, the first entry of library/sdxl_model_util.py's
make_unet_conversion_map (SDXL's three levels, two res blocks each, fixed) whose diffusers
name is a substring of the key's module name; a file key matching no created module is
not applied, without a message. Header: kohya writes ss_network_dim, ss_network_alpha, ss_v2
and ss_base_model_version ("sdxl_base_v1-0", "sd_v2"; library/model_util.py appends "_v" for
v-prediction); its merge scripts read back ss_v2 and ss_base_model_version.

A1111 extensions-builtin/Lora, networks.py at 873edba44bed: convert_diffusers_name_to_compvis
sends lora_unet_{down,mid,up}_blocks_... to diffusion_model_input_blocks_{1 + 3 * level +
i}_1_..., middle_block_1_..., output_blocks_{3 * level + i}_1_...; lora_te1_text_model_... to
0_transformer_text_model_...; lora_te2_ to OpenCLIP's 1_model_transformer_resblocks_<b>_...
(SD 2.x's lora_te_: model_transformer_resblocks_...; self_attn -> attn, mlp_fc1 -> mlp_c_fc,
mlp_fc2 -> mlp_c_proj), where q/k/v_proj fall back to the fused MultiheadAttention, patched
only when the layer's q, k, v and out_proj all come in the file. network.py at f2844bd024ff,
detect_version: SDXL when ss_base_model_version starts with "sdxl_", else SD 2 when ss_v2 ==
"True".

Tolerance against the trained model: 1e-5 (helpers.ATOL), fp32 on the CPU (a weight merge
sums in another order than peft's layers: up to 3e-6 off here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn

from sai_diffusion._resources import sdxl_config_dir
from sai_diffusion.config import DEFAULT_LORA_TARGETS
from sai_diffusion.files.ldm import pipeline_to_ldm, unet_to_ldm
from sai_diffusion.models.inference import load_run
from sai_diffusion.training import recipe
from tests.helpers import assert_outputs_close, make_concept, outputs, setup_run

RANK, ALPHA, TE_ALPHA = 4, 8.0, 2.0  # alpha != rank, and per part: a loader must read .alpha
PROMPT = "a pencil sketch of <Vthing>"  # make_concept's word
# lr 2 (text encoders 10) for 2 steps moves every output by 1e-3..1e-1: far above the tolerances
TRAINING = ("text_encoder_lora=true", "train_embeddings=true", "lr=2.0",
            "optimizer.lr_text_encoder=10", f"lora.rank={RANK}", f"lora.alpha={ALPHA}")  # fmt: skip
CLIP_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2")  # fmt: skip


# --------------------------------------------------------------------------- the runs


@dataclass
class Trained:
    run: Path
    reference: dict[str, torch.Tensor]  # the trained in-memory model's outputs


def _train(concept: Path, base: Path, out: Path, *settings: str, outputs_of) -> Trained:
    """A 2-step run through the recipe, its files written, and ``outputs_of`` its live model."""
    run = setup_run(concept, base, out, *TRAINING, *settings, steps=2, batch=1)
    out.mkdir()
    recipe.train(run)
    recipe.save_outputs(run)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(run.pipe, part, None) is not None:
            getattr(run.pipe, part).eval()
    return Trained(out, outputs_of(run.pipe))


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    return make_concept(tmp_path_factory.mktemp("concept"))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir, concept, tmp_path_factory) -> Trained:
    """LoRA on the UNet and both text encoders (UNet alpha 8, text encoders 2), one word."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    return _train(concept, tiny_sdxl_dir, out, f"lora.text_encoder_alpha={TE_ALPHA}",
                  outputs_of=_sdxl_outputs)  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_dora(tiny_sdxl_dir, concept, tmp_path_factory) -> Trained:
    """As ``sdxl`` with DoRA, one alpha (8) for every module."""
    out = tmp_path_factory.mktemp("sdxl-dora") / "run"
    return _train(concept, tiny_sdxl_dir, out, "use_dora=true", outputs_of=_sdxl_outputs)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_dir, concept, tmp_path_factory) -> Trained:
    """A tiny SD 2.x (v-prediction) run with text-encoder LoRA."""
    out = tmp_path_factory.mktemp("sd2") / "run"
    return _train(concept, tiny_sd2_dir, out, outputs_of=outputs)


def _kohya_file(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = run / "lora_kohya.safetensors"
    with safetensors.safe_open(path, framework="pt") as f:
        header = f.metadata()
    return safetensors.torch.load_file(path), header


def _modules(tensors: dict) -> set[str]:
    """The module names of a kohya file (its keys less .lora_down.weight and the like)."""
    return {key.split(".", 1)[0] for key in tensors}


# --------------------------------------------------------------------------- pipelines


def _sdxl(base: Path, run: Path | None = None) -> StableDiffusionXLPipeline:
    """A fresh stock pipeline; with ``run``, its words loaded as stock diffusers takes them:
    clip_l's rows into the first encoder, clip_g's into the second, one row per word of the
    header's list."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if run is not None:
        path = run / "embeddings.safetensors"
        with safetensors.safe_open(path, framework="pt") as f:
            words = json.loads(f.metadata()["tokens"])
        rows = safetensors.torch.load_file(path)
        pipe.load_textual_inversion(list(rows["clip_l"]), token=words,
                                    text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)  # fmt: skip
        pipe.load_textual_inversion(list(rows["clip_g"]), token=words,
                                    text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)  # fmt: skip
    return pipe


@torch.no_grad()
def _sdxl_outputs(pipe) -> dict[str, torch.Tensor]:
    """PROMPT through each encoder (all layers, so every layer's LoRA counts), as
    encode_prompt conditions the UNet, and the UNet on fixed and on PROMPT's inputs."""
    out = {}
    for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out[name] = getattr(pipe, name)(ids).last_hidden_state  # (1, 77, 32) / (1, 77, 48)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    fixed_pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g)
    sizes = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])  # original, crop, target
    unet = pipe.unet
    out |= {
        "prompt_embeds": hidden,  # (1, 77, 80)
        "pooled": pooled,  # (1, 24)
        "unet": unet(latents, 500, context,
                     added_cond_kwargs={"text_embeds": fixed_pooled, "time_ids": sizes}).sample,
        "unet_on_prompt": unet(latents, 500, hidden,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample,
    }  # fmt: skip
    return out


def _not_a_no_op(got: dict, base: dict) -> None:
    """Every output moved by the run far beyond the tolerance (a file that loads nothing
    would otherwise pass)."""
    for name in base:
        assert (got[name] - base[name]).abs().max() > 1e-3, name


# --------------------------------------------------------------------------- ComfyUI


def _comfy_unet_config(config) -> dict:
    """The fields of ComfyUI's detected unet_config that unet_to_diffusers reads, for the
    UNet a diffusers ``config`` describes (one count per res block, from level 0 up)."""
    levels = len(config.block_out_channels)
    per_level = config.transformer_layers_per_block
    per_level = [per_level] * levels if isinstance(per_level, int) else list(per_level)
    res = config.layers_per_block
    down = [per_level[x] if "CrossAttn" in config.down_block_types[x] else 0 for x in range(levels)]
    # up_blocks[k] serves level (levels - 1 - k)
    up = [per_level[x] if "CrossAttn" in config.up_block_types[levels - 1 - x] else 0
          for x in range(levels)]  # fmt: skip
    return {
        "num_res_blocks": [res] * levels,
        "channel_mult": [1] * levels,  # only its length is read
        "transformer_depth": [d for d in down for _ in range(res)],
        "transformer_depth_output": [d for d in up for _ in range(res + 1)],
        "transformer_depth_middle": per_level[-1],
    }


_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_TRANSFORMER = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
                      *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v",
                                                                  "to_out.0")))  # fmt: skip
_COMFY_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0",
                 "norm2": "out_layers.0", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}  # fmt: skip


def _comfy_unet_to_diffusers(cfg: dict) -> dict[str, str]:
    """ComfyUI's unet_to_diffusers for weights: diffusers module name -> LDM module name (its
    basic entries, conv_in, time_embedding..., are left out: no LoRA of ours goes there)."""
    out = {}

    def attention(src: str, dst: str, depth: int) -> None:
        out.update({f"{src}.{n}": f"{dst}.{n}" for n in _COMFY_ATTENTION})
        for t in range(depth):
            out.update({f"{src}.transformer_blocks.{t}.{n}": f"{dst}.transformer_blocks.{t}.{n}"
                        for n in _COMFY_TRANSFORMER})  # fmt: skip

    def resnet(src: str, dst: str) -> None:
        out.update({f"{src}.{d}": f"{dst}.{ldm}" for d, ldm in _COMFY_RESNET.items()})

    res, depth = cfg["num_res_blocks"], list(cfg["transformer_depth"])
    for x in range(len(cfg["channel_mult"])):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if d := depth.pop(0):
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", d)
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", cfg["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    depth_out = list(cfg["transformer_depth_output"])
    for x, r in enumerate(reversed(res)):
        n = (r + 1) * x
        for i in range(r + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            c = 1
            if d := depth_out.pop():  # from the end: the lowest resolution first
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", d)
                c += 1
            if i == r:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    return out


def _clip_layer(encoder: nn.Module, b: int, projection: str) -> nn.Module:
    """Layer b's projection; transformers 5's CLIPTextModel has no ``text_model`` level."""
    try:
        return encoder.get_submodule(f"text_model.encoder.layers.{b}.{projection}")
    except AttributeError:
        return encoder.get_submodule(f"encoder.layers.{b}.{projection}")


def _comfy_key_map(pipe) -> dict[str, tuple[nn.Module, str]]:
    """ComfyUI's kohya-style LoRA key names for ``pipe`` -> (module, LDM name or '')."""
    keys = {}
    ldm = _comfy_unet_to_diffusers(_comfy_unet_config(pipe.unet.config))
    for name, module in pipe.unet.named_modules():
        if name in ldm:  # ComfyUI's unet_to_diffusers table names it
            keys["lora_unet_" + name.replace(".", "_")] = (module, ldm[name])
    if getattr(pipe, "text_encoder_2", None) is not None:  # clip_l and clip_g
        encoders = {"lora_te1_": pipe.text_encoder, "lora_te2_": pipe.text_encoder_2}
    else:  # SD 2.x: clip_h
        encoders = {"lora_te_": pipe.text_encoder, "lora_te1_": pipe.text_encoder}
    for prefix, encoder in encoders.items():
        for b in range(min(32, encoder.config.num_hidden_layers)):
            for p in CLIP_PROJECTIONS:
                key = f"{prefix}text_model_encoder_layers_{b}_{p.replace('.', '_')}"
                keys[key] = (_clip_layer(encoder, b, p), "")
    return keys


@torch.no_grad()
def _merge_as_comfyui(pipe, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Merge a kohya file into ``pipe``'s weights by ComfyUI's rules; returns the keys read."""
    key_map, used = _comfy_key_map(pipe), set()
    for module_name in _modules(tensors):
        if module_name not in key_map:
            continue  # ComfyUI: "lora key not loaded"
        weight = key_map[module_name][0].weight
        t = {part: tensors[f"{module_name}.{part}"] for part in
             ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
             if f"{module_name}.{part}" in tensors}  # fmt: skip
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        merged = weight + t["alpha"].item() / down.shape[0] * delta
        if "dora_scale" in t:
            scale = t["dora_scale"]
            assert scale.shape[0] == weight.shape[0]  # the output-axis reading
            norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
            merged = merged * (scale / (norm.reshape(scale.shape) + torch.finfo(weight.dtype).eps))
        weight.copy_(merged)
        used |= {f"{module_name}.{part}" for part in t}
    return used


def test_comfyui_loads_every_sdxl_kohya_key_and_rebuilds_the_trained_model(tiny_sdxl_dir, sdxl):
    tensors, _ = _kohya_file(sdxl.run)
    comfy = _sdxl(tiny_sdxl_dir, sdxl.run)  # the words as stock diffusers loads them
    base = _sdxl_outputs(comfy)
    assert _merge_as_comfyui(comfy, tensors) == set(tensors)  # no "lora key not loaded"
    assert_outputs_close(_sdxl_outputs(comfy), sdxl.reference)
    _not_a_no_op(sdxl.reference, base)


def test_comfyuis_unet_index_rule_lands_on_the_same_weight_in_the_tiny_sdxl(tiny_sdxl_dir, sdxl):
    """The LDM name ComfyUI sends each UNet key to holds that module's weight in the
    checkpoint layout (files.ldm, itself checked against diffusers' single-file reader)."""
    tensors, _ = _kohya_file(sdxl.run)
    pipe = _sdxl(tiny_sdxl_dir)
    key_map, ldm = _comfy_key_map(pipe), unet_to_ldm(pipe.unet)
    unet_keys = {m for m in _modules(tensors) if m.startswith("lora_unet_")}
    assert len(unet_keys) == 4 * sum(n.endswith(".attn1") or n.endswith(".attn2")
                                     for n, _ in pipe.unet.named_modules())  # fmt: skip
    for module_name in unet_keys:
        module, ldm_name = key_map[module_name]
        assert torch.equal(ldm[f"model.diffusion_model.{ldm_name}.weight"], module.weight)


def test_sdxl_dora_keys_carry_dora_scale_and_comfyui_rebuilds_the_trained_model(
    tiny_sdxl_dir, sdxl_dora
):
    tensors, header = _kohya_file(sdxl_dora.run)
    modules = _modules(tensors)
    assert {m for m in modules if f"{m}.dora_scale" in tensors} == modules  # every module
    assert any(m.startswith("lora_te2_") for m in modules)
    assert "ComfyUI" in header["sai_dora_scale"]
    comfy = _sdxl(tiny_sdxl_dir, sdxl_dora.run)
    base = _sdxl_outputs(comfy)
    assert _merge_as_comfyui(comfy, tensors) == set(tensors)
    assert_outputs_close(_sdxl_outputs(comfy), sdxl_dora.reference)
    _not_a_no_op(sdxl_dora.reference, base)
    ours = _sdxl(tiny_sdxl_dir)
    load_run(ours, sdxl_dora.run)  # restores the text encoders' magnitudes diffusers drops
    assert_outputs_close(_sdxl_outputs(ours), sdxl_dora.reference)
    # stock diffusers 0.42: the UNet's DoRA loads; both encoders' magnitudes do not (0.1-0.3 off)
    stock = _sdxl(tiny_sdxl_dir, sdxl_dora.run)
    stock.load_lora_weights(sdxl_dora.run, weight_name="lora.safetensors")
    assert_outputs_close(_sdxl_outputs(stock), {"unet": sdxl_dora.reference["unet"]})


# --------------------------------------------------------------------------- kohya sd-scripts


def _kohya_sdxl_unet_table() -> dict[str, str]:
    """sdxl_model_util.make_unet_conversion_map as convert_diffusers_to_sai_if_needed holds it:
    {diffusers module prefix: SAI prefix}, underscores, trailing one dropped, kohya's order."""
    pairs = []  # (SAI, diffusers), dotted, as kohya builds them
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
              ("skip_connection.", "conv_shortcut.")]  # fmt: skip

    def add(sai: str, hf: str) -> None:
        if "resnets" in hf:
            pairs.extend((sai + s, hf + h) for s, h in resnet)
        else:
            pairs.append((sai, hf))

    for i in range(3):  # SDXL's three levels, fixed
        for j in range(2):
            add(f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}.")
            add(f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
        for j in range(3):
            add(f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}.")
            add(f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")
        add(f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
        add(f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0.")
    add("middle_block.1.", "mid_block.attentions.0.")
    for j in range(2):
        add(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.")
    # (time_embed, label_emb, conv_in and out follow in kohya's list: no LoRA of ours there)
    return {hf.replace(".", "_")[:-1]: sai.replace(".", "_")[:-1] for sai, hf in pairs}


def _kohya_sai_name(module_name: str, table: dict[str, str]) -> str | None:
    """convert_diffusers_to_sai_if_needed for one lora_unet_ module name (None: not found)."""
    name = module_name.removeprefix("lora_unet_")
    for hf, sai in table.items():
        if hf in name:  # the first entry that is a substring, as kohya's loop
            return "lora_unet_" + name.replace(hf, sai)
    return None


def _kohya_names(root: nn.Module, prefix: str, targets: tuple[str, ...], rename=str) -> set[str]:
    """LoRANetwork.create_modules: prefix + "." + path of each Linear / 1x1 Conv2d child of a
    module whose class is in ``targets``, dots as underscores (``rename`` maps the path)."""
    names = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, nn.Linear) or (
                isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
            ):
                names.add(f"{prefix}.{rename(f'{name}.{child_name}')}".replace(".", "_"))
    return names


KOHYA_UNET = ("Transformer2DModel",)
KOHYA_TEXT = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _kohya_text_path(path: str) -> str:
    """kohya runs transformers 4, whose CLIPTextModel keeps the ``text_model`` level."""
    return path if path.startswith("text_model.") else "text_model." + path


def test_kohya_creates_a_module_for_every_sdxl_key_under_the_right_encoder(tiny_sdxl_dir, sdxl):
    tensors, _ = _kohya_file(sdxl.run)
    pipe = _sdxl(tiny_sdxl_dir)
    table, modules = _kohya_sdxl_unet_table(), _modules(tensors)
    unet = {m for m in modules if m.startswith("lora_unet_")}
    sai = {_kohya_sai_name(m, table) for m in unet}
    # every UNet key renamed: one kohya misses keeps its diffusers name, which names no
    # module of kohya's SDXL UNet, and is dropped without a word
    assert None not in sai
    created = {_kohya_sai_name(n, table) for n in _kohya_names(pipe.unet, "lora_unet", KOHYA_UNET)}
    assert sai <= created
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        ours = {m for m in modules if m.startswith(prefix + "_")}
        assert ours and ours <= _kohya_names(encoder, prefix, KOHYA_TEXT, _kohya_text_path)
        width = encoder.config.hidden_size  # 32 (CLIP-L's place), 48 (bigG's): not swapped
        assert all(tensors[f"{m}.lora_down.weight"].shape[1] == width for m in ours)
    assert modules == unet | {m for m in modules if m.startswith(("lora_te1_", "lora_te2_"))}


def test_kohya_header_of_an_sdxl_run(sdxl, sdxl_dora):
    tensors, header = _kohya_file(sdxl.run)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"  # A1111: SDXL ("sdxl_" prefix)
    assert header["ss_v2"] == "False"
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == str(RANK)
    assert {tensors[k].shape[0] for k in tensors if k.endswith(".lora_down.weight")} == {RANK}
    alphas = {(k.split("_", 2)[1], tensors[k].item()) for k in tensors if k.endswith(".alpha")}
    assert alphas == {("unet", ALPHA), ("te1", TE_ALPHA), ("te2", TE_ALPHA)}
    # two alphas: no single ss_network_alpha is claimed, each part's is named
    assert "ss_network_alpha" not in header
    assert (header["sai_unet_alpha"], header["sai_text_encoder_alpha"]) == ("8.0", "2.0")
    _, header = _kohya_file(sdxl_dora.run)  # one alpha for every module
    assert header["ss_network_alpha"] == str(ALPHA)


def test_full_size_sdxl_unet_names_reach_the_same_weight_in_comfyui_kohya_and_a1111():
    """Our UNet keys are lora_unet_ + the diffusers name. On SDXL's own layout (configs/sdxl,
    on the meta device) the three clients send every attention projection's key to the same
    checkpoint weight; on the tiny layout only ComfyUI's rule (general) and kohya's renaming
    within one table can be checked, kohya's and A1111's numbers being SDXL's fixed ones."""
    config = json.loads((sdxl_config_dir() / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    checkpoint = unet_to_ldm(unet)
    comfy = _comfy_unet_to_diffusers(_comfy_unet_config(unet.config))
    table = _kohya_sdxl_unet_table()
    names = [n for n, _ in unet.named_modules() if n.endswith(DEFAULT_LORA_TARGETS)]
    assert len(names) == 560  # 70 transformer blocks, 2 attentions, 4 projections
    for name in names:
        key, ldm = "lora_unet_" + name.replace(".", "_"), comfy[name]
        assert f"model.diffusion_model.{ldm}.weight" in checkpoint, name
        assert _kohya_sai_name(key, table) == "lora_unet_" + ldm.replace(".", "_"), name
        assert _a1111_unet_name(key) == "diffusion_model_" + ldm.replace(".", "_"), name


# --------------------------------------------------------------------------- A1111


def _a1111_unet_name(key: str) -> str:
    """convert_diffusers_name_to_compvis for a UNet attention key (its resnet, sampler and
    conv_in branches left out)."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.fullmatch(r"lora_unet_mid_block_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_1_{m[2]}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    return key


def _a1111_open_clip_name(layer: str, rest: str, embedder: str) -> str:
    rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
    return f"{embedder}model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"


def _a1111_module(key: str, layers: set[str], *, sd2: bool = False) -> str | None:
    """load_network's lookup of one text-encoder key in ``layers`` (the model's module names,
    dots as underscores): the converted name, else its fused attention, else lora_te1_'s
    renaming; None when it fails to match."""
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        name = _a1111_open_clip_name(m[1], m[2], "1_")
    elif (m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)) and sd2:
        name = _a1111_open_clip_name(m[1], m[2], "")
    else:
        name = key
    if name in layers:
        return name
    if (m := re.fullmatch(r"(.*)_([qkv]_proj)", name)) and m[1] in layers:
        return m[1]
    name = key.replace("lora_te1_text_model", "0_transformer_text_model")
    return name if name in layers else None


def _a1111_layers(checkpoint: dict, prefixes: dict[str, str]) -> set[str]:
    """A1111's network_layer_mapping names of the text encoders, from the checkpoint's
    parameter names (module path = the parameter name less its last part)."""
    layers = set()
    for key in checkpoint:
        for prefix, name in prefixes.items():
            if key.startswith(prefix):
                layers.add((name + key[len(prefix) :]).rsplit(".", 1)[0].replace(".", "_"))
    return layers


def _assert_a1111_applies(text_keys, layers: set[str], *, sd2: bool = False) -> None:
    """Every text-encoder module name finds its module, and OpenCLIP's fused attentions get
    all four projections (A1111 patches one only then, and says nothing otherwise)."""
    found = {m: _a1111_module(m, layers, sd2=sd2) for m in text_keys}
    assert None not in found.values(), [m for m, v in found.items() if v is None]
    fused = [m for m, v in found.items() if v.endswith("_attn")]
    for layer in {found[m] for m in fused}:
        parts = {m.rsplit("_", 2)[-2] for m in fused if found[m] == layer} | {
            m.rsplit("_", 2)[-2] for m in text_keys if found[m] == layer + "_out_proj"
        }
        assert parts == {"q", "k", "v", "out"}, layer


def test_a1111_applies_every_text_encoder_key_of_the_sdxl_run(tiny_sdxl_dir, sdxl):
    tensors, _ = _kohya_file(sdxl.run)
    checkpoint = pipeline_to_ldm(_sdxl(tiny_sdxl_dir))
    layers = _a1111_layers(checkpoint, {"conditioner.embedders.0.": "0.",
                                        "conditioner.embedders.1.": "1."})  # fmt: skip
    text = {m for m in _modules(tensors) if m.startswith("lora_te")}
    assert any(m.startswith("lora_te2_") for m in text)
    _assert_a1111_applies(text, layers)


# --------------------------------------------------------------------------- stock diffusers


def test_stock_diffusers_and_load_run_reproduce_the_trained_sdxl_model(tiny_sdxl_dir, sdxl):
    """lora.safetensors through load_lora_weights and each encoder's rows through
    load_textual_inversion compute the trained model; so does our own load_run."""
    rows = safetensors.torch.load_file(sdxl.run / "embeddings.safetensors")
    stock = _sdxl(tiny_sdxl_dir, sdxl.run)
    widths = (stock.text_encoder.config.hidden_size, stock.text_encoder_2.config.hidden_size)
    # ComfyUI reads an SDXL embedding by these keys too (sd1_clip.load_embed's embedding_key)
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"clip_l": (1, widths[0]),
                                                            "clip_g": (1, widths[1])}  # fmt: skip
    base = _sdxl_outputs(stock)
    stock.load_lora_weights(sdxl.run, weight_name="lora.safetensors")
    assert_outputs_close(_sdxl_outputs(stock), sdxl.reference)
    _not_a_no_op(sdxl.reference, base)
    ours = _sdxl(tiny_sdxl_dir)
    load_run(ours, sdxl.run)
    assert_outputs_close(_sdxl_outputs(ours), sdxl.reference)


# --------------------------------------------------------------------------- SD 2.x


def test_the_sd2_run_is_named_for_sd2_in_kohyas_and_a1111s_reading(tiny_sd2_dir, sd2):
    tensors, header = _kohya_file(sd2.run)
    assert (header["ss_base_model_version"], header["ss_v2"]) == (
        "sd_v2_v",
        "True",
    )  # a v-prediction model
    modules = _modules(tensors)
    text = {m for m in modules if m.startswith("lora_te_")}
    assert text and modules == text | {m for m in modules if m.startswith("lora_unet_")}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, local_files_only=True)
    # kohya: SD 2.x's UNet keeps diffusers' names, its one encoder is lora_te
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet <= _kohya_names(pipe.unet, "lora_unet", KOHYA_UNET)
    assert text <= _kohya_names(pipe.text_encoder, "lora_te", KOHYA_TEXT, _kohya_text_path)
    # A1111: OpenCLIP names of cond_stage_model.model
    _assert_a1111_applies(text, _a1111_layers(pipeline_to_ldm(pipe), {"cond_stage_model.": ""}),
                          sd2=True)  # fmt: skip
    # ComfyUI: clip_h answers to lora_te_; merged, the file gives the trained model (PROMPT
    # of tests.helpers has no word of the run)
    base = outputs(pipe)
    assert _merge_as_comfyui(pipe, tensors) == set(tensors)
    assert_outputs_close(outputs(pipe), sd2.reference)
    _not_a_no_op(sd2.reference, base)
