"""Load the base model a LoRA is trained on, offline, from whatever the user points at.

    diffusers folder (model_index.json)   -> StableDiffusionPipeline.from_pretrained
    single-file .safetensors (ChilloutMix) -> from_single_file, configs from configs/sd15
    .ckpt / .pt / .pth / .bin (pickle)     -> refused unless allow_pickle
    hub id "owner/name"                    -> from_pretrained (needs the network or the cache)
    "miniature"                            -> the built-in miniature model (configs/miniature)

Every way a path can be wrong ends in one ``UserError`` that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from .._resources import miniature_dir, sd15_config_dir
from ..config import BUILTIN_BASE_MODEL, TrainConfig
from ..errors import UserError, first_line
from ..files import ldm

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
WEIGHT_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FINGERPRINT_HEAD = 1 << 20  # folders: hash each weight file's first MiB, not all of it
_SD_FAMILY = "SD 1.5-class (SD 1.5, ChilloutMix, Realistic Vision, ...)"


def resolve_source(source: str | Path) -> str | Path:
    """``source`` itself, or the shipped folder when it names the built-in miniature model
    (``_resources.miniature_dir``): the rest of the real path sees a diffusers folder like any
    other.

    Raises:
        UserError: the built-in model is missing from this installation.
    """
    if str(source) != BUILTIN_BASE_MODEL:  # a local folder of that name is "./miniature"
        return source
    folder = miniature_dir()
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"The built-in miniature model is missing ({folder}); reinstall sai-diffusion, "
            "rebuild it with `python scripts/pretrain_world.py`, or pass --base-model."
        )
    return folder


def load_base_model(
    source: str | Path | None,
    *,
    base_config: Path | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """Load an SD 1.5-class pipeline (no safety checker) on the CPU, in eval mode.

    ``base_config`` is the weight-free diffusers folder that describes a single-file
    checkpoint's architecture; the shipped ``configs/sd15`` by default.

    Raises:
        UserError: the source is missing, empty, not a Stable Diffusion model, corrupt, a
            pickle file without ``allow_pickle``, of another architecture than the config,
            or a hub id that cannot be reached.
    """
    if source is None or str(source).strip() == "":
        raise UserError(
            "No base model given. Pass --base-model with a diffusers folder, a single-file "
            ".safetensors checkpoint or a hub id (owner/name)."
        )
    source = resolve_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            _refuse_pickle(path, allow_pickle)
        elif path.suffix.lower() != ".safetensors":
            raise UserError(
                f"Base model {path} is not a model file sai-diffusion can read: expected a "
                ".safetensors checkpoint, a diffusers folder or a hub id."
            )
        else:
            _check_single_file(path)
        config = Path(base_config) if base_config is not None else sd15_config_dir()
        return _load_single_file(path, config, torch_dtype=torch_dtype)
    if _looks_like_hub_id(str(source)):
        return _load_hub(str(source), torch_dtype=torch_dtype)
    raise UserError(
        f"Base model {path} does not exist. Check the path given to --base-model (a diffusers "
        "folder or a .safetensors file), or give a hub id as owner/name."
    )


def load_base(cfg: TrainConfig, *, torch_dtype: torch.dtype = torch.float32):
    """The base model a run's settings name (``base.model``, ``base.config``,
    ``base.allow_pickle``); see ``load_base_model``."""
    base = cfg.base
    return load_base_model(
        base.model,
        base_config=Path(base.config) if base.config else None,
        allow_pickle=base.allow_pickle,
        torch_dtype=torch_dtype,
    )


def model_fingerprint(source: str | Path) -> str:
    """A short identity of the base model for run metadata.

    A file: ``sha256:<hex>`` of its bytes, streamed. A folder: ``sha256-quick:<hex>`` over
    each weight file's relative name, size and first MiB (seconds, not minutes, for 4 GB of
    weights). A hub id that is not a local path: ``hub:<id>``.

    Raises:
        UserError: the source does not exist and is not a hub id.
    """
    source = resolve_source(source)
    path = Path(source).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_FINGERPRINT_HEAD):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    if path.is_dir():
        digest = hashlib.sha256()
        for file in _weight_files(path):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
            with file.open("rb") as f:
                digest.update(f.read(_FINGERPRINT_HEAD))
        return f"sha256-quick:{digest.hexdigest()}"
    if _looks_like_hub_id(str(source)):
        return f"hub:{source}"
    raise UserError(f"Base model {path} does not exist; cannot fingerprint it.")


# --- the four kinds of source -------------------------------------------------------------


def _load_folder(path: Path, *, allow_pickle: bool, torch_dtype: torch.dtype):
    if not any(path.iterdir()):
        raise UserError(
            f"Base model folder {path} is empty. Point --base-model at a diffusers folder "
            "(with model_index.json) or at a single-file .safetensors checkpoint."
        )
    if not (path / "model_index.json").is_file():
        singles = sorted(p.name for p in path.glob("*.safetensors"))
        if singles:
            hint = f"It holds {', '.join(singles[:3])}: pass that file instead."
        else:
            hint = "Point --base-model at a diffusers folder or a .safetensors checkpoint."
        raise UserError(
            f"{path} is not a diffusers model folder: it has no model_index.json. {hint}"
        )
    if not allow_pickle:
        pickled = _pickle_only_components(path)
        if pickled:
            raise UserError(
                f"Base model folder {path} stores {', '.join(pickled)} only as pickle files "
                "(.bin), which can run code when loaded. If you trust it, allow it with "
                "`--set allow_pickle=true`; better, re-save the folder with safetensors "
                "(pipe.save_pretrained(dir, safe_serialization=True))."
            )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            dtype=torch_dtype,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as e:  # diffusers/transformers raise OSError, ValueError, KeyError, ...
        raise UserError(
            f"Could not load the diffusers folder {path}: {first_line(e)}. It must be a complete "
            f"{_SD_FAMILY} pipeline: model_index.json plus unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/ with their weights and configs."
        ) from e
    return _checked(pipe, path)


def _load_single_file(path: Path, config: Path, *, torch_dtype: torch.dtype):
    if not (config / "model_index.json").is_file():
        raise UserError(
            f"Config folder {config} for single-file checkpoints has no model_index.json. "
            "Pass a weight-free diffusers folder with `--base-config DIR` (or "
            "`--set base_config=DIR`), or leave base_config unset to use the shipped configs/sd15."
        )
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, dtype=torch_dtype
        )
    except Exception as e:  # shape mismatches arrive as ValueError, missing parts as others
        detail = first_line(e)
        # A shape mismatch says more than the list of names the other architecture lacks.
        missing = [] if "expected shape" in detail else _missing_single_file_weights(path, config)
        if missing:
            raise UserError(
                f"{path} lacks {len(missing)} weights that the architecture in {config} needs "
                f"(e.g. {missing[0]}): the file is incomplete or of another architecture. Use a "
                f"complete {_SD_FAMILY} checkpoint, or pass its own config folder with "
                "`--base-config DIR`."
            ) from e
        raise UserError(
            f"Could not load {path} as the architecture described by {config}: "
            f"{detail}. sai-diffusion trains {_SD_FAMILY} checkpoints; SD 2.x and SDXL "
            "files are not supported. For an SD 1.x variant with other sizes, pass its "
            "diffusers config folder with `--base-config DIR` (or `--set base_config=DIR`)."
        ) from e
    return _checked(pipe, path)


def _load_hub(hub_id: str, *, torch_dtype: torch.dtype):
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            hub_id, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
    except Exception as e:  # offline: OSError; unknown repo: RepositoryNotFoundError, ...
        raise UserError(
            f"Base model {hub_id!r} is not a local path, and as a hub id it could not be loaded "
            f"(offline, or not in the local cache): {first_line(e)}. Pass a local diffusers "
            "folder or a single-file .safetensors checkpoint with --base-model, or run once "
            "online to cache the model."
        ) from e
    return _checked(pipe, Path(hub_id))


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    raise UserError(
        f"Base model {path} is a pickle file ({path.suffix}), which can run arbitrary code when "
        "loaded, so it is refused by default. If you trust its source, allow it with "
        "`--set allow_pickle=true`. Better: convert it once to .safetensors (e.g. with "
        "safetensors.torch.save_file on its state dict) and use that file."
    )


# --- checks ---------------------------------------------------------------------------------


def _check_single_file(path: Path) -> None:
    """Read only the header: catches truncated files and files that are not checkpoints."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"{path} is not a readable .safetensors file ({e}); it is probably truncated or "
            "corrupt. Download or copy it again."
        ) from e
    family = _other_sd_family(keys)
    if family:
        raise UserError(
            f"{path} is {family} checkpoint; sai-diffusion trains {_SD_FAMILY} models only. "
            "Pick an SD 1.5-based checkpoint for --base-model."
        )
    if any(k.startswith(ldm.UNET_PREFIX) for k in keys):
        prefixes = (ldm.VAE_PREFIX, ldm.TEXT_PREFIX)
        missing = [p for p in prefixes if not any(k.startswith(p) for k in keys)]
        if missing:
            raise UserError(
                f"{path} holds a UNet but no {' or '.join(missing)}* weights: it is not a "
                "complete Stable Diffusion checkpoint. Use the full checkpoint (UNet, VAE "
                "and text encoder in one file) or a diffusers folder."
            )
        return
    if any("lora" in k.lower() for k in keys):
        kind = "a LoRA file, not a base model"
    elif any(k.startswith(("down_blocks.", "encoder.", "text_model.")) for k in keys):
        kind = "one component of a diffusers folder; pass the folder with model_index.json"
    else:
        kind = "not a Stable Diffusion checkpoint"
    raise UserError(
        f"{path} has no model.diffusion_model.* weights: it looks like {kind}. "
        "--base-model needs a full checkpoint or a diffusers folder."
    )


def _other_sd_family(keys: list[str]) -> str | None:
    """'an SDXL' / 'an SD 2.x' when the checkpoint's text encoder gives it away, else None."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP ViT-H
        return "an SD 2.x"
    return None


def _checked(pipe: StableDiffusionPipeline, origin: Path) -> StableDiffusionPipeline:
    # from_single_file builds models on the meta device and fills in what the file holds:
    # a tensor the file lacks stays on "meta" with no error. Catch that here.
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        empty = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if empty:
            raise UserError(
                f"{origin} lacks {len(empty)} {name} weights (e.g. {empty[0]}): the file is "
                "incomplete or of another architecture. Use a complete SD 1.5-class checkpoint."
            )
    return pipe


def _missing_single_file_weights(path: Path, config: Path) -> list[str]:
    """Checkpoint names the config's architecture needs but ``path`` lacks (a diagnosis after
    a failed load: diffusers reports missing UNet/VAE weights only as "Cannot copy out of meta
    tensor"). Empty when the file cannot be read or the config cannot be built."""
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
        with init_empty_weights():  # shapes only, no memory
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(config / "unet")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
        expected = {
            **ldm.unet_to_ldm(unet),
            **ldm.vae_to_ldm(vae),
            **ldm.text_encoder_to_ldm(text),
        }
    except Exception:  # a diagnosis must never hide the original error
        return []
    return sorted(set(expected) - present)


def _pickle_only_components(path: Path) -> list[str]:
    out = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        suffixes = {f.suffix.lower() for f in sub.iterdir() if f.is_file()}
        if suffixes & PICKLE_SUFFIXES and ".safetensors" not in suffixes:
            out.append(sub.name)
    return out


def _weight_files(path: Path) -> list[Path]:
    files = (f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES)
    return sorted(files, key=lambda f: f.relative_to(path).as_posix())


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and Path(text).suffix.lower() not in WEIGHT_SUFFIXES
