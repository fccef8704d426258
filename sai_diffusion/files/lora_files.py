"""The LoRA files of a run: written so that other tools load them, and read back.

    lora.safetensors         diffusers' format, in the one spelling that both diffusers'
                             ``load_lora_weights`` and ComfyUI's key map read (below), with
                             alpha / rank folded into the up factors and alpha = rank in
                             diffusers' ``lora_adapter_metadata`` header entry
    lora_kohya.safetensors   kohya / A1111 / ComfyUI: ``lora_unet_<module>.lora_down.weight``,
                             ``.lora_up.weight`` and a scalar ``.alpha`` per module, ss_* header
    embeddings.safetensors   textual-inversion embeddings of the concept tokens, one
                             ``{token: (1, dim)}`` entry per token

(the names are ``files.run_dir``'s). The LoRA is peft's: ``W x + (alpha / r) * B A x`` with
A (r, in) and B (out, r), injected by ``models.lora.add_lora`` under the adapter name
``ADAPTER``. The kohya file keeps the raw factors with the true per-module alpha (loaders
compute alpha / rank themselves); diffusers' own ``convert_state_dict_to_kohya`` writes
alpha = rank, which mis-scales any LoRA trained with alpha != rank, so it is not used here.

The diffusers file's keys (``diffusers_key`` writes them, ``parse_diffusers_key`` reads them):

    unet.<attn>.processor.to_q_lora.down.weight      a UNet attention projection (to_q, to_k,
    unet.<attn>.processor.to_out_lora.up.weight      to_v, to_out.0 as ``to_out``)
    unet.<module>.lora.down.weight                   any other UNet layer (LoCon's convs, ...)
    text_encoder.text_model.<module>.lora_linear_layer.down.weight   (and text_encoder_2.)
    <part>.<module>.lora_magnitude_vector            DoRA: the layer's trained row norms

ComfyUI (comfy/lora.py ``model_lora_keys_unet``, comfy/weight_adapter/lora.py, both at
Comfy-Org/ComfyUI a125cd84b054, v0.3.64) answers to a diffusers UNet layer only as ``unet.`` +
its name with ``.to_`` written ``.processor.to_`` and ``.to_out.0`` as ``.to_out``, and its
LoRA loader reads ``<that>_lora.up.weight``; diffusers (``convert_unet_state_dict_to_peft``, 0.32 and 0.42) drops
``.processor.`` and reads ``.to_q_lora.down`` as ``.to_q.lora_A``. peft's own ``lora_A`` names
(diffusers' writer today) and ``.to_q.lora.down`` load in diffusers but not in ComfyUI. Both
read the text encoders' ``lora_linear_layer`` keys and the other layers' ``.lora.down``.
Neither reads the other's DoRA: ComfyUI skips ``lora_magnitude_vector`` (its DoRA is the kohya
file's ``dora_scale``), diffusers drops ``dora_scale``.

LoCon (LoRA on Conv2d layers) keeps peft's 4-D factors in both files, as kohya's LoCon writes
them: down (r, in, k, k), up (out, r, 1, 1). DoRA adds each layer's trained magnitude: peft's
``lora_magnitude_vector`` keys in the diffusers file, a ``dora_scale`` per output row in the
kohya file (``_dora_scale``: written for ComfyUI's reading of that layout). Which tools read a
DoRA file wrongly is ``dora_readers_note``'s message.

The diffusers file has no per-module alpha: loaders that ignore its header (diffusers before
its LoRA-metadata change, ComfyUI) take alpha = rank, i.e. scale 1. So the file stores
B' = (alpha / rank) B and says alpha = rank: a reading with or without the header computes the
trained W x + (alpha / rank) B A x. Which tool maps which keys of which file is
docs/file-formats.md's table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from ..fsutil import atomic_path
from .run_dir import KOHYA_FILE, LORA_FILE, RunDir

ADAPTER = "default"  # the peft adapter (peft's default name) that training adds and files hold

# Training-metadata keys the caller may give, and the kohya header names they are copied to.
_SS_ALIASES = {
    "optimizer": "ss_optimizer",
    "learning_rate": "ss_learning_rate",
    "max_train_steps": "ss_max_train_steps",
    "resolution": "ss_resolution",
}


@dataclass(frozen=True)
class FileKeys:
    """How one model family's LoRA files name its parts (``models.family`` holds it): the
    diffusers file prefixes each part's keys with the part's name (``unet.``,
    ``text_encoder.``), the kohya file with ``kohya_prefixes[part]``; kohya's header names the
    family in ``ss_base_model_version`` and ``ss_v2``."""

    kohya_prefixes: Mapping[str, str]
    base_model_version: str
    v2: bool = False


SD_KEYS = FileKeys({"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v1")
SD2_KEYS = FileKeys({"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v2", v2=True)
# kohya's SDXL names: lora_te1_ (CLIP ViT-L), lora_te2_ (OpenCLIP bigG, as transformers names it)
SDXL_KEYS = FileKeys(
    {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "sdxl_base_v1-0",
)


class _Factors(NamedTuple):
    """One LoRA layer: A (r, in) or, on a conv, (r, in, k, k); B (out, r) or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None  # DoRA's trained row norms, (out,) or (1, out, 1, 1)
    base: torch.Tensor  # the frozen weight the layer adapts (out, in[, k, k])


# --------------------------------------------------------------------------- saving


def save_lora(
    run_dir: Path,
    *,
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    rank: int,
    alpha: float,
    text_encoder_alpha: float | None = None,
    metadata: Mapping[str, str],
    keys: FileKeys = SD_KEYS,
) -> dict[str, Path]:
    """Write ``lora.safetensors`` (diffusers) and ``lora_kohya.safetensors`` into ``run_dir``,
    named as ``keys`` (the model family's) says.

    Both carry the LoRA of ``unet`` and, if they have one, of ``text_encoder`` (and SDXL's
    ``text_encoder_2``, ``lora_te2_`` in kohya's names), with the training
    ``metadata`` in the header (string values only; ``optimizer``, ``learning_rate``,
    ``max_train_steps`` and ``resolution`` are also copied to kohya's ss_* names). ``rank``,
    ``alpha`` and ``text_encoder_alpha`` (default: ``alpha``) must match the adapters: they
    are checked, because a wrong alpha gives a file that loads but is mis-scaled.

    Returns:
        {"lora": path, "lora_kohya": path}
    """
    run = RunDir(run_dir)
    _check_metadata(metadata)
    te_alpha = alpha if text_encoder_alpha is None else text_encoder_alpha
    parts = [("unet", unet, _lora_modules(unet, "unet"))]
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        modules = _lora_modules(encoder, name) if encoder is not None else {}
        if modules:  # a text encoder without LoRA (only new tokens) adds nothing here
            parts.append((name, encoder, modules))
    if not parts[0][2]:
        raise ValueError("The UNet has no LoRA adapter: call add_lora before save_lora.")
    _check_rank_alpha(parts[0][2], "UNet", rank=rank, alpha=alpha)
    for name, _, modules in parts[1:]:
        _check_rank_alpha(modules, name.replace("_", " "), rank=None, alpha=te_alpha)

    diffusers_tensors, adapter_config, kohya_tensors = {}, {}, {}
    for prefix, model, modules in parts:
        diffusers_tensors |= _diffusers_tensors(modules, prefix)
        adapter_config |= _adapter_config(model, prefix)
        kohya_tensors |= _kohya_tensors(modules, keys.kohya_prefixes[prefix])

    header = _training_header(metadata, keys, rank=rank, alpha=alpha,
                              text_encoder_alpha=te_alpha if len(parts) > 1 else None)  # fmt: skip
    header |= _network_args([f for _, _, modules in parts for f in modules.values()], rank, alpha)
    # diffusers rebuilds each LoraConfig (r, lora_alpha, targets) from this entry; alpha is
    # folded, so the entry says alpha = rank like every loader that ignores it assumes
    diffusers_header = {
        **{k: v for k, v in header.items() if k != "ss_network_alpha"},
        "sai_alpha_folded": "true",
        "lora_adapter_metadata": json.dumps(adapter_config, sort_keys=True),
    }
    paths = {"lora": run.lora, "lora_kohya": run.kohya}
    atomic_save_tensors(diffusers_tensors, paths["lora"], diffusers_header)
    atomic_save_tensors(kohya_tensors, paths["lora_kohya"], header)
    return paths


def _training_header(
    metadata: Mapping[str, str],
    keys: FileKeys,
    *,
    rank: int,
    alpha: float,
    text_encoder_alpha: float | None,
) -> dict[str, str]:
    """The caller's metadata plus the ss_* fields kohya-reading tools show (dim, alpha, ...)."""
    header = {"format": "pt", **metadata}
    header |= {ss: metadata[key] for key, ss in _SS_ALIASES.items() if key in metadata}
    if header.get("ss_resolution", "").isdigit():  # kohya writes "(512, 512)"
        header["ss_resolution"] = f"({header['ss_resolution']}, {header['ss_resolution']})"
    header |= {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_base_model_version": keys.base_model_version,
        "ss_v2": str(keys.v2),
    }
    # kohya's header has one alpha; each module's own .alpha is what loaders apply. Claim one
    # only when every module carries it.
    if text_encoder_alpha is None or text_encoder_alpha == alpha:
        header["ss_network_alpha"] = str(float(alpha))
    else:
        header["sai_unet_alpha"] = str(float(alpha))
        header["sai_text_encoder_alpha"] = str(float(text_encoder_alpha))
    return header


def _network_args(modules: list[_Factors], rank: int, alpha: float) -> dict[str, str]:
    """kohya's ``ss_network_args`` for conv layers (``conv_dim``, ``conv_alpha``), and for DoRA
    how ``dora_scale`` is meant. Not LyCORIS's ``dora_wd``: its own merge divides by the norms
    of W + dW, which would read these values wrongly."""
    header = {}
    if any(f.down.dim() == 4 for f in modules):
        header["ss_network_args"] = json.dumps({"conv_dim": str(int(rank)),
                                                "conv_alpha": f"{alpha:g}"})  # fmt: skip
    if any(f.magnitude is not None for f in modules):
        header["sai_dora_scale"] = (
            "m * |W| / |W + dW| per output row: ComfyUI's reading of dora_scale"
        )
    return header


def save_embeddings(
    path: Path,
    *,
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: nn.Module,
    tokens: list[str],
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write the embedding rows of ``tokens`` as a textual-inversion file: ``{token: (1, dim)}``;
    with SDXL's ``text_encoder_2``, SDXL's layout ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``
    (one row per token, in order), which ComfyUI and A1111 read as one embedding and diffusers
    as ``pipe.load_textual_inversion(sd["clip_l"], token=tokens, text_encoder=pipe.text_encoder,
    tokenizer=pipe.tokenizer)`` and the same with ``clip_g`` for the second encoder.

    One token: stock ``pipe.load_textual_inversion(path)`` reads it (the single key names the
    token; ``token=`` may rename it). Several tokens: diffusers
    reads a file only when it has one key, so load them with ``models.inference.RunModels``
    or pass the tensors: ``pipe.load_textual_inversion([sd[t] for t in tokens],
    token=tokens)``. The
    header's ``tokens`` entry (JSON list) keeps their order.
    """
    path = Path(path)
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"Tokens {missing} are not in the tokenizer: add them first.")
    ids = torch.tensor([vocab[t] for t in tokens])
    rows = _rows(text_encoder, ids)
    if text_encoder_2 is None:
        tensors = {t: rows[i : i + 1].clone() for i, t in enumerate(tokens)}  # (1, dim) each
    else:
        tensors = {"clip_l": rows, "clip_g": _rows(text_encoder_2, ids)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, path, {"format": "pt", "tokens": json.dumps(tokens)})
    return path


def _rows(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(n, dim): the rows of ``ids``, by a lookup, not .weight[ids]: a training-time wrapper
    (models.tokens.ConceptTokenEmbedding) keeps the trained rows outside .weight."""
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).float().cpu().contiguous()


def _check_metadata(metadata: Mapping[str, str]) -> None:
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")


def _lora_modules(model: nn.Module, what: str) -> dict[str, _Factors]:
    """{canonical module name: (A (r, in), B (out, r), alpha)} for every LoRA layer of ``model``."""
    found = {}
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and ADAPTER in module.lora_A):
            continue
        r, alpha = module.r[ADAPTER], module.lora_alpha[ADAPTER]
        # Refuse what the files cannot express: rsLoRA (alpha / sqrt r) or a scale changed
        # after injection (set_adapters weights).
        if abs(module.scaling[ADAPTER] - alpha / r) > 1e-9 * max(1.0, alpha / r):
            raise ValueError(
                f"{what}.{name}: LoRA scaling {module.scaling[ADAPTER]} != alpha / rank "
                f"({alpha} / {r}); files would be mis-scaled."
            )
        down = module.lora_A[ADAPTER].weight
        up = module.lora_B[ADAPTER].weight
        dora = getattr(module, "lora_magnitude_vector", {})
        magnitude = dora[ADAPTER].weight if ADAPTER in dora else None
        found[_canonical(name, what)] = _Factors(
            down, up, float(alpha), magnitude, module.get_base_layer().weight
        )
    return found


def _canonical(name: str, what: str) -> str:
    """Module names as SD 1.5 LoRA files spell them.

    transformers 5 flattened CLIPTextModel (``encoder.layers.0...``); kohya, A1111 and older
    diffusers/transformers say ``text_model.encoder.layers.0...``, and diffusers 0.42 strips
    that prefix again when loading into a flattened model.
    """
    if what.startswith("text_encoder") and not name.startswith("text_model."):
        return "text_model." + name
    return name


def _check_rank_alpha(
    modules: dict[str, _Factors], what: str, *, rank: int | None, alpha: float
) -> None:
    for name, factors in modules.items():
        down, module_alpha = factors.down, factors.alpha
        if (rank is not None and down.shape[0] != rank) or module_alpha != alpha:
            raise ValueError(
                f"{what} LoRA module {name} has rank {down.shape[0]}, alpha {module_alpha}; "
                f"save_lora was told rank {rank}, alpha {alpha}."
            )


def _diffusers_tensors(modules: dict[str, _Factors], part: str) -> dict[str, torch.Tensor]:
    """``part``'s layers under ``diffusers_key``'s names: down, up * alpha / rank (the module
    docstring says why) and, for DoRA, the magnitude as peft holds it."""
    out = {}
    for name, factors in modules.items():
        scale = factors.alpha / factors.down.shape[0]
        out[diffusers_key(part, name, "down")] = factors.down.detach().contiguous()
        out[diffusers_key(part, name, "up")] = (factors.up.detach() * scale).contiguous()
        if factors.magnitude is not None:
            out[diffusers_key(part, name, "magnitude")] = factors.magnitude.detach().contiguous()
    return out


# A UNet attention projection's last name -> its attention processor's name for it.
_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_DIFFUSERS_KEY = re.compile(
    r"(?P<part>unet|text_encoder|text_encoder_2)\.(?:"
    r"(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p_side>down|up)\.weight"
    r"|(?P<module>.+?)\.(?:lora|lora_linear_layer)\.(?P<side>down|up)\.weight"
    r"|(?P<dora>.+)\.lora_magnitude_vector)"
)


def diffusers_key(part: str, module: str, what: str) -> str:
    """The ``lora.safetensors`` key of ``module`` (its name in ``part``, text encoders' with
    ``text_model.``) for ``what``: "down", "up" or "magnitude" (the module docstring lists
    the forms and why the UNet's attention projections take their processors' names)."""
    if what == "magnitude":
        return f"{part}.{module}.lora_magnitude_vector"
    if part != "unet":
        return f"{part}.{module}.lora_linear_layer.{what}.weight"
    for last, processor_name in _PROCESSOR_NAMES.items():
        if module.endswith("." + last):
            attention = module[: -len(last) - 1]
            return f"unet.{attention}.processor.{processor_name}_lora.{what}.weight"
    return f"unet.{module}.lora.{what}.weight"


def parse_diffusers_key(key: str) -> tuple[str, str, str]:
    """(part, module, what) of a ``lora.safetensors`` key: the inverse of ``diffusers_key``
    (the module named as in the model, ``...attn1.to_out.0``).

    Raises:
        ValueError: ``key`` is not of a form this project writes.
    """
    found = _DIFFUSERS_KEY.fullmatch(key)
    if found is None:
        raise ValueError(f"{key!r} is not one of this project's {LORA_FILE} keys")
    if found["attn"] is not None:
        projection = "to_out.0" if found["proj"] == "to_out" else found["proj"]
        return found["part"], f"{found['attn']}.{projection}", found["p_side"]
    if found["module"] is not None:
        return found["part"], found["module"], found["side"]
    return found["part"], found["dora"], "magnitude"


def _adapter_config(model: nn.Module, prefix: str) -> dict[str, object]:
    """The LoraConfig fields diffusers needs to rebuild the adapter, keyed ``<prefix>.<field>``,
    for the folded factors: alpha = rank everywhere.

    Only the fields that shape the forward pass: a full ``LoraConfig.to_dict()`` would carry
    fields that older peft versions reject.
    """
    config = model.peft_config[ADAPTER]
    targets = config.target_modules
    fields = {
        "r": config.r,
        "lora_alpha": config.r,  # alpha / rank is folded into the up factors
        "target_modules": sorted(targets) if isinstance(targets, set | list) else targets,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.rank_pattern),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
    }
    return {f"{prefix}.{k}": v for k, v in fields.items()}


def _kohya_tensors(modules: dict[str, _Factors], prefix: str) -> dict[str, torch.Tensor]:
    """kohya's keys: ``lora_unet_<module, dots as underscores>`` (``lora_te_text_model_...``)
    with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` and, for DoRA, ``.dora_scale``.
    A conv layer's factors keep their 4-D shapes (LoCon's layout, which ComfyUI and A1111
    read as up.flatten(1) @ down.flatten(1))."""
    out = {}
    for name, factors in modules.items():
        base = prefix + name.replace(".", "_")
        out[f"{base}.lora_down.weight"] = factors.down.detach().contiguous()
        out[f"{base}.lora_up.weight"] = factors.up.detach().contiguous()
        # 0-dim, as kohya writes it
        out[f"{base}.alpha"] = torch.tensor(factors.alpha, dtype=torch.float32)
        if factors.magnitude is not None:
            out[f"{base}.dora_scale"] = _dora_scale(factors)
    return out


@torch.no_grad()
def _dora_scale(factors: _Factors) -> torch.Tensor:
    """(out, 1) or (out, 1, 1, 1): the ``dora_scale`` that gives peft's DoRA weight under the
    output-axis reading of ComfyUI and Forge (both measured, scripts/check_clients.py).

    peft trains W' = m * (W + dW) / |W + dW| per output row (dW = alpha / r * B A). A
    ``dora_scale`` whose first dimension is the layer's output is read there as
    W' = s * (W + dW) / |W| (the base weight's row norms, plus float eps), so the file holds
    s = m * |W| / |W + dW|; A1111 reads only the input-axis layout (LyCORIS's
    wd_on_output=False), which peft's DoRA cannot produce.
    """
    weight = factors.base.detach().float()
    down, up = factors.down.detach().float(), factors.up.detach().float()
    delta = (factors.alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
    merged = weight.flatten(1) + delta  # (out, in * k * k)
    scale = factors.magnitude.detach().float().reshape(-1) * weight.flatten(1).norm(dim=1)
    scale = scale / merged.norm(dim=1)
    return scale.reshape(-1, *[1] * (weight.dim() - 1)).contiguous()


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a safetensors file so that ``path`` is either absent/old or the complete new one."""
    data = safetensors.torch.save({k: v.cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def dora_readers_note(family: str) -> str:
    """What a ``lora.dora=true`` run of model ``family`` ("sd1", "sd2", "sdxl") prints once
    about its files: which tools compute the trained model from which file, and which read it
    wrongly. From docs/file-formats.md's table (measured with scripts/check_clients.py and,
    for A1111 1.10.1's DoRA, in issue 31), on SD 1.5 files; an SD 2.x or SDXL file is named and read by the
    same rules (tests/files/test_sdxl_files.py).

    Raises:
        ValueError: an unknown family.
    """
    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"unknown model family {family!r}: sd1, sd2 or sdxl")
    encoders = "text encoders'" if family == "sdxl" else "text encoder's"
    lora, kohya = LORA_FILE, KOHYA_FILE
    return "\n".join([
        "note: a DoRA run's LoRA files are not read right by every tool (docs/file-formats.md, "
        "'Which tool loads which file'):",
        f"  right: {lora} in sai-sample, sai-compare, the app, load_run, diffusers 0.32 "
        "(transformers 4.54)",
        f"         {kohya} in ComfyUI and Forge",
        f"  wrong: diffusers 0.42 (transformers 5), {lora}: the {encoders} DoRA magnitudes "
        "(text-encoder LoRA) are not loaded",
        f"         ComfyUI, {lora}: the magnitudes are skipped (plain LoRA)",
        f"         kohya sd-scripts, diffusers, {kohya}: dora_scale ignored (plain LoRA)",
        f"         A1111 1.10, {kohya}: loads without an error, wrong weights",
        "         LyCORIS 4.1.3: its loader stops on SD UNets; its merge gives wrong weights",
        f"         Forge, {lora}: nothing applied (it skips a file with unmatched keys)",
    ])  # fmt: skip


# --------------------------------------------------------------------------- loading


@torch.no_grad()
def restore_text_encoder_magnitudes(
    text_encoder: nn.Module, path: Path, adapter: str, *, part: str = "text_encoder"
) -> None:
    """Copy a DoRA file's magnitudes of text encoder ``part`` into the loaded adapter.

    diffusers 0.42 builds the text encoder's DoRA layers but, with transformers 5's flattened
    CLIPTextModel, loads none of their ``lora_magnitude_vector`` tensors (reported as missing;
    they keep their initial values, so the encoder computes plain LoRA). The UNet's load fine.
    """
    prefix, suffix = part + ".", ".lora_magnitude_vector"
    with safetensors.safe_open(path, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefix) and k.endswith(suffix)]  # noqa: SIM118 (safe_open has no __iter__)
        for key in keys:
            name = key[len(prefix) : -len(suffix)]
            try:
                module = text_encoder.get_submodule(name)
            except AttributeError:  # a flattened model: no text_model level
                module = text_encoder.get_submodule(name.removeprefix("text_model."))
            module.lora_magnitude_vector[adapter].weight.copy_(f.get_tensor(key))


def read_embeddings(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's concept-token vectors, ``{token: (dim,)}`` in the file's order; ``{}`` when the
    run has no ``embeddings.safetensors`` (it added no tokens). An SDXL file's two rows per
    token come as one vector, clip_l's then clip_g's (``models.tokens.set_token_embeddings``
    splits it by the encoders' widths).

    Raises:
        UserError: the file is unreadable or holds a multi-vector token.
    """
    path = RunDir(run_dir).embeddings
    if not path.is_file():
        return {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tokens = json.loads(header["tokens"]) if "tokens" in header else list(f.keys())
            if set(f.keys()) == {"clip_l", "clip_g"}:  # noqa: SIM118 (safe_open has no __iter__)
                both = torch.cat([f.get_tensor("clip_l"), f.get_tensor("clip_g")], dim=-1)
                if both.shape[0] != len(tokens):
                    raise KeyError(f"{both.shape[0]} rows for {len(tokens)} tokens")
                vectors = {t: both[i] for i, t in enumerate(tokens)}
            else:
                vectors = {t: f.get_tensor(t) for t in tokens}
    except (safetensors.SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path} is not a readable embeddings file ({e}); train the run again or restore "
            "the file."
        ) from e
    for token, vector in vectors.items():
        if vector.dim() == 2 and vector.shape[0] == 1:
            vectors[token] = vector[0]
        elif vector.dim() != 1:
            raise UserError(
                f"{path}: token {token!r} has {tuple(vector.shape)} vectors; sai-diffusion "
                "writes one (1, dim) vector per token, so this file is not from one of its runs."
            )
    return vectors


def lora_numel(run_dir: Path) -> int:
    """Number of trained LoRA weights in a run's ``lora.safetensors`` (0 when absent)."""
    path = RunDir(run_dir).lora
    if not path.is_file():
        return 0
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = f.keys()  # safe_open has no __iter__
        return sum(math.prod(f.get_slice(key).get_shape()) for key in keys)
