"""Load the base model a LoRA is trained on, offline, from whatever the user points at.

    diffusers folder (model_index.json)  -> its _class_name's from_pretrained
    single-file .safetensors             -> from_single_file, with the shipped config folder of
                                            the file's family (configs/sd15, sd2 or sdxl)
    .ckpt / .pt / .pth / .bin (pickle)   -> refused unless allow_pickle
    hub id "owner/name"                  -> downloaded (or cached) folder, then as a folder
    "miniature"                          -> the built-in miniature model (configs/miniature)

The result is a ``StableDiffusionPipeline`` (SD 1.x, SD 2.x) or a
``StableDiffusionXLPipeline`` on the CPU, in eval mode, without safety checker or watermark.

A single file's family comes from its text encoders' names (``files.ldm.layout_of_keys``):
``conditioner.embedders.*`` is SDXL, ``cond_stage_model.model.*`` (OpenCLIP) SD 2.x,
``cond_stage_model.transformer.*`` SD 1.x.

What the UNet predicts (``prediction_type``): "epsilon" or "v_prediction" as asked; "auto"
takes, in order, a ``v_pred`` tensor in a single file (ComfyUI marks the v-models it saves so),
for an SD 2.x single file the weights (the population std of
``output_blocks.11.1.transformer_blocks.0.norm1.bias`` above 0.09 means 768-v, else 512-base
epsilon: ComfyUI's rule), and otherwise the scheduler config of the folder (the model's own, or
the config folder of a single file). The pipeline's scheduler is rebuilt with the answer, so
``pipe.scheduler.config.prediction_type`` is it, and ``pipe.sai_prediction_note`` says how it
was decided, e.g. ``"v_prediction (the v_pred marker in model.safetensors)"``;
``prediction_note(pipe)`` reads it for any pipeline.

Every way a path can be wrong ends in one ``UserError`` that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .._resources import miniature_dir, sd2_config_dir, sd15_config_dir, sdxl_config_dir
from ..config import BUILTIN_BASE_MODEL, TrainConfig
from ..errors import UserError, first_line
from ..files import ldm

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
WEIGHT_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FINGERPRINT_HEAD = 1 << 20  # folders: hash each weight file's first MiB, not all of it
_SUPPORTED = "Stable Diffusion 1.x, 2.x or SDXL"
# Keyword arguments of each class's from_pretrained / from_single_file: no safety checker
# (training never needs it), no invisible watermark (SDXL adds one when the package is there).
_PIPELINE_KWARGS = {
    StableDiffusionPipeline: {"safety_checker": None, "requires_safety_checker": False},
    StableDiffusionXLPipeline: {"add_watermarker": False},
}
_FOLDER_PARTS = {
    StableDiffusionPipeline: "unet/, vae/, text_encoder/, tokenizer/ and scheduler/",
    StableDiffusionXLPipeline: (
        "unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/"
    ),
}
_PIPELINES = {cls.__name__: cls for cls in _PIPELINE_KWARGS}  # model_index _class_name
# A single file's family (files.ldm layouts): its name and its shipped config folder.
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_FAMILY_CONFIGS = {"sd1": sd15_config_dir, "sd2": sd2_config_dir, "sdxl": sdxl_config_dir}
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# ComfyUI tells SD 2.x 768-v weights from 512-base ones by this tensor's spread.
_V_PRED_MARKER = "v_pred"
_V_PRED_PROBE = ldm.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_V_PRED_MIN_STD = 0.09


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
    prediction_type: str = "auto",
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load an SD 1.x, SD 2.x or SDXL pipeline (no safety checker) on the CPU, in eval mode.

    ``base_config`` is the weight-free diffusers folder that describes a single-file
    checkpoint's architecture; by default the shipped one of the file's family (configs/sd15,
    configs/sd2, configs/sdxl). ``prediction_type`` is "auto", "epsilon" or "v_prediction"
    (the module docstring says how "auto" decides); the answer is in the scheduler's config and
    ``pipe.sai_prediction_note`` says where it came from.

    Raises:
        UserError: the source is missing, empty, not a Stable Diffusion model of a supported
            family, corrupt, a pickle file without ``allow_pickle``, of another architecture
            than the config, or a hub id that cannot be reached; ``prediction_type`` is unknown.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
            f"{prediction_type!r}. Set it with `--set base.prediction_type=auto`."
        )
    if source is None or str(source).strip() == "":
        raise UserError(
            "No base model given. Pass --base-model with a diffusers folder, a single-file "
            ".safetensors checkpoint or a hub id (owner/name)."
        )
    source = resolve_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        pipe = _load_folder(path, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
        return _set_prediction(pipe, prediction_type, None, path)
    if path.is_file():
        keys = _single_file_keys(path, allow_pickle)
        family = _check_single_file(path, keys)
        config = Path(base_config) if base_config is not None else _FAMILY_CONFIGS[family]()
        pipe = _load_single_file(path, keys, family, config, torch_dtype=torch_dtype)
        found = _file_prediction(path, keys, family) if prediction_type == "auto" else None
        return _set_prediction(pipe, prediction_type, found, config)
    if _looks_like_hub_id(str(source)):
        pipe = _load_hub(str(source), allow_pickle=allow_pickle, torch_dtype=torch_dtype)
        return _set_prediction(pipe, prediction_type, None, str(source))
    raise UserError(
        f"Base model {path} does not exist. Check the path given to --base-model (a diffusers "
        "folder or a .safetensors file), or give a hub id as owner/name."
    )


def load_base(cfg: TrainConfig, *, torch_dtype: torch.dtype = torch.float32):
    """The base model a run's settings name (``base.model``, ``base.config``,
    ``base.allow_pickle``, ``base.prediction_type``); see ``load_base_model``."""
    base = cfg.base
    return load_base_model(
        base.model,
        base_config=Path(base.config) if base.config else None,
        allow_pickle=base.allow_pickle,
        torch_dtype=torch_dtype,
        prediction_type=base.prediction_type,
    )


@dataclass(frozen=True)
class BaseInfo:
    """What a base model is, read from its configs (and a single file's header) before any
    weight loads: its family ("sd1", "sd2", "sdxl") and the image side it was trained at."""

    family: str
    native_resolution: int

    @property
    def label(self) -> str:
        return _FAMILY_NAMES[self.family]


def describe_base(cfg: TrainConfig) -> BaseInfo:
    """``BaseInfo`` of the base model a run's settings name: a folder's model_index.json and
    component configs; a single file's header names and its config folder; a hub id's
    downloaded (or cached) folder. Fast: no weight is read (except a pickle file's, allowed).

    Raises:
        UserError: the same bad sources ``load_base_model`` refuses, before any weight loads.
    """
    base = cfg.base
    if base.model is None or str(base.model).strip() == "":
        load_base_model(base.model)  # its one message for a missing --base-model
    path = Path(resolve_source(base.model)).expanduser()
    if path.is_file():
        keys = _single_file_keys(path, base.allow_pickle)
        family = _check_single_file(path, keys)
        folder = Path(base.config) if base.config else _FAMILY_CONFIGS[family]()
        return BaseInfo(family, _native_resolution(folder))
    if not path.is_dir() and _looks_like_hub_id(str(base.model)):
        try:
            path = Path(DiffusionPipeline.download(str(base.model)))
        except Exception as e:  # offline, unknown repository, ...
            raise _unreachable_hub_id(str(base.model), e) from e
    if not (path / "model_index.json").is_file():
        load_base_model(base.model, allow_pickle=base.allow_pickle)  # its message for this
    cls = _pipeline_class(_model_index_class(path), path)
    if cls is StableDiffusionXLPipeline:
        family = "sdxl"
    else:
        text = _read_json(path / "text_encoder" / "config.json")
        family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"  # OpenCLIP: exact GELU
    return BaseInfo(family, _native_resolution(path))


def _native_resolution(folder: Path) -> int:
    """The UNet's sample size times the VAE's downsampling, from their configs."""
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    try:
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{folder}: unet/config.json or vae/config.json lacks {first_line(e)}; it is not a "
            "complete diffusers config folder. Copy it again or pass another --base-config."
        ) from e


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path} is missing or unreadable ({first_line(e)}); the model folder is "
            "incomplete. Copy it again, or pass a single-file checkpoint."
        ) from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; the model folder is damaged.")
    return data


def prediction_note(pipe) -> str:
    """How ``pipe``'s prediction type was decided: ``pipe.sai_prediction_note`` as
    ``load_base_model`` sets it, else (a pipeline built otherwise) its scheduler's own."""
    note = getattr(pipe, "sai_prediction_note", None)
    return note or f"{pipe.scheduler.config.prediction_type} (the pipeline's scheduler config)"


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
    cls = _pipeline_class(_model_index_class(path), path)
    try:
        pipe = cls.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True, **_PIPELINE_KWARGS[cls]
        )
    except Exception as e:  # diffusers/transformers raise OSError, ValueError, KeyError, ...
        raise UserError(
            f"Could not load the diffusers folder {path}: {first_line(e)}. It must be a complete "
            f"{cls.__name__}: model_index.json plus {_FOLDER_PARTS[cls]} with their weights "
            "and configs."
        ) from e
    return _checked(pipe, path)


def _load_single_file(
    path: Path, keys: list[str], family: str, config: Path, *, torch_dtype: torch.dtype
):
    name = _FAMILY_NAMES[family]
    default = f"the shipped configs/{_FAMILY_CONFIGS[family]().name}"
    if not (config / "model_index.json").is_file():
        raise UserError(
            f"Config folder {config} for single-file checkpoints has no model_index.json. "
            "Pass a weight-free diffusers folder with `--base-config DIR` (or "
            f"`--set base_config=DIR`), or leave base_config unset to use {default}."
        )
    cls = _pipeline_class(_model_index_class(config), config)
    if (cls is StableDiffusionXLPipeline) != (family == "sdxl"):
        raise UserError(
            f"{path} is an {name} checkpoint, but {config} describes a {cls.__name__}. Pass "
            f"the config folder of an {name} model with `--base-config DIR`, or leave "
            f"base_config unset to use {default}."
        )
    try:
        pipe = cls.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            dtype=torch_dtype,
            **_PIPELINE_KWARGS[cls],
        )
    except Exception as e:  # shape mismatches arrive as ValueError, missing parts as others
        detail = first_line(e)
        # diffusers names a shape mismatch only for some components; find one, else the names
        # the architecture needs and the file lacks ("Cannot copy out of meta tensor").
        missing, mismatch = [], None
        if "expected shape" not in detail:
            missing, mismatch = _diagnose(path, keys, family, config)
        if mismatch:
            detail = mismatch
        elif missing:
            raise UserError(
                f"{path} lacks {len(missing)} weights that the architecture in {config} needs "
                f"(e.g. {missing[0]}): the file is incomplete or of another architecture. Use a "
                f"complete {name} checkpoint, or pass its own config folder with "
                "`--base-config DIR`."
            ) from e
        raise UserError(
            f"Could not load {path} as the architecture described by {config}: {detail}. "
            f"For an {name} variant of other sizes, pass its diffusers config folder with "
            "`--base-config DIR` (or `--set base_config=DIR`)."
        ) from e
    return _checked(pipe, path)


def _load_hub(hub_id: str, *, allow_pickle: bool, torch_dtype: torch.dtype):
    """Fetch (or find in the cache) the repository's files, then load them as a folder."""
    try:
        snapshot = DiffusionPipeline.download(hub_id)
    except Exception as e:  # offline: OSError; unknown repo: RepositoryNotFoundError, ...
        raise _unreachable_hub_id(hub_id, e) from e
    return _load_folder(Path(snapshot), allow_pickle=allow_pickle, torch_dtype=torch_dtype)


def _unreachable_hub_id(hub_id: str, error: Exception) -> UserError:
    return UserError(
        f"Base model {hub_id!r} is not a local path, and as a hub id it could not be loaded "
        f"(offline, or not in the local cache): {first_line(error)}. Pass a local diffusers "
        "folder or a single-file .safetensors checkpoint with --base-model, or run once "
        "online to cache the model."
    )


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    raise UserError(
        f"Base model {path} is a pickle file ({path.suffix}), which can run arbitrary code when "
        "loaded, so it is refused by default. If you trust its source, allow it with "
        "`--set allow_pickle=true`. Better: convert it once to .safetensors (e.g. with "
        "safetensors.torch.save_file on its state dict) and use that file."
    )


# --- pipeline classes -----------------------------------------------------------------------


def _model_index_class(folder: Path) -> str | None:
    """The ``_class_name`` of ``folder/model_index.json``."""
    index = folder / "model_index.json"
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(
            f"{index} is not a readable diffusers model index ({first_line(e)}). Copy the "
            "folder again, or point --base-model at a single-file .safetensors checkpoint."
        ) from e


def _pipeline_class(name: str | None, origin: Path | str):
    cls = _PIPELINES.get(name or "")
    if cls is None:
        raise UserError(
            f"{origin} holds a {name or 'nameless'} pipeline (model_index.json's _class_name); "
            f"sai-diffusion trains {_SUPPORTED} models ({' or '.join(_PIPELINES)}). "
            "Pick a base model of one of those families."
        )
    return cls


# --- prediction type ------------------------------------------------------------------------


def _file_prediction(path: Path, keys: list[str], family: str) -> tuple[str, str] | None:
    """(prediction type, how it was read) when the single file itself tells, else None."""
    if _V_PRED_MARKER in keys:
        return "v_prediction", f"the v_pred marker in {path}"
    if family == "sd2" and _V_PRED_PROBE in keys:
        std = _read_tensor(path, _V_PRED_PROBE).float().std(correction=0).item()
        kind, sign = ("v_prediction", ">") if std > _V_PRED_MIN_STD else ("epsilon", "<=")
        return kind, f"the weights of {path}: norm1 bias std {std:.3f} {sign} {_V_PRED_MIN_STD}"
    return None


def _set_prediction(pipe, requested: str, found: tuple[str, str] | None, origin: Path | str):
    """Give ``pipe`` the scheduler the decided prediction type needs, and note why."""
    if requested != "auto":
        kind, note = requested, f"{requested} (base.prediction_type)"
    elif found is not None:
        kind, note = found[0], f"{found[0]} ({found[1]})"
    else:
        kind = pipe.scheduler.config.prediction_type
        note = f"{kind} (the scheduler config of {origin})"
    if pipe.scheduler.config.prediction_type != kind:
        scheduler = pipe.scheduler
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=kind)
    pipe.sai_prediction_note = note
    return pipe


# --- reading single files and checks --------------------------------------------------------


def _single_file_keys(path: Path, allow_pickle: bool) -> list[str]:
    """The tensor names of a checkpoint file, read from the header only where possible.

    Raises:
        UserError: not a model file type, a refused pickle, or unreadable (truncated).
    """
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path, allow_pickle)
        return list(_pickle_state(path))
    if suffix != ".safetensors":
        raise UserError(
            f"Base model {path} is not a model file sai-diffusion can read: expected a "
            ".safetensors checkpoint, a diffusers folder or a hub id."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"{path} is not a readable .safetensors file ({e}); it is probably truncated or "
            "corrupt. Download or copy it again."
        ) from e


def _pickle_state(path: Path) -> dict:
    """A pickle checkpoint's state dict, read as diffusers reads it (tensors only, memory-mapped
    when the file is a zip archive, so no copy of the weights)."""
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise UserError(
            f"{path} could not be read as a PyTorch checkpoint ({first_line(e)}): it is "
            "corrupt or holds more than tensors. Convert it to .safetensors where it was made."
        ) from e
    while isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints nest it
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict of tensors; it is not a model checkpoint.")
    return state


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _pickle_state(path)[key]
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _check_single_file(path: Path, keys: list[str]) -> str:
    """The file's family ("sd1", "sd2", "sdxl"), once its names show a complete checkpoint.

    Raises:
        UserError: a UNet without the VAE or a text encoder its family needs, or no UNet.
    """
    if any(k.startswith(ldm.UNET_PREFIX) for k in keys):
        family = ldm.layout_of_keys(keys)
        missing = [] if any(k.startswith(ldm.VAE_PREFIX) for k in keys) else [ldm.VAE_PREFIX]
        if family is None:
            missing.append("cond_stage_model. / conditioner.embedders.")
        else:
            missing += [
                p for p in ldm.TEXT_PREFIXES[family] if not any(k.startswith(p) for k in keys)
            ]
        if missing:
            kind = _FAMILY_NAMES[family] if family else "Stable Diffusion"
            raise UserError(
                f"{path} holds a UNet but no {' or '.join(p + '*' for p in missing)} weights: "
                f"it is not a complete {kind} checkpoint. Use the full checkpoint (UNet, VAE "
                "and text encoders in one file) or a diffusers folder."
            )
        return family
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


def _checked(pipe, origin: Path):
    # from_single_file builds models on the meta device and fills in what the file holds:
    # a tensor the file lacks stays on "meta" with no error. Catch that here.
    for name in _COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        empty = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if empty:
            raise UserError(
                f"{origin} lacks {len(empty)} {name} weights (e.g. {empty[0]}): the file is "
                f"incomplete or of another architecture. Use a complete {_SUPPORTED} "
                "checkpoint, or pass its own config folder with `--base-config DIR`."
            )
    return pipe


def _diagnose(
    path: Path, keys: list[str], family: str, config: Path
) -> tuple[list[str], str | None]:
    """Why a single file did not load as ``config``'s architecture: the checkpoint names the
    architecture needs but the file lacks, and the first tensor whose shape differs (a
    sentence), if any. ([], None) when the config cannot be built: a diagnosis must never hide
    the original error."""
    try:
        with init_empty_weights():  # shapes only, no memory
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(config / "unet")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
            text_2 = None
            if family == "sdxl":
                text_2 = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(config / "text_encoder_2")
                )
        expected = ldm.components_to_ldm(
            unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, layout=family
        )
        shapes = _shapes(path, [k for k in expected if k in set(keys)])
    except Exception:
        return [], None
    missing = sorted(set(expected) - set(keys))
    for key, shape in shapes.items():
        if shape != tuple(expected[key].shape):
            return missing, (
                f"{key} has shape {list(shape)}, expected shape {list(expected[key].shape)}"
            )
    return missing, None


def _shapes(path: Path, keys: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``keys`` in a checkpoint file (safetensors: from the header alone)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = _pickle_state(path)
        return {k: tuple(state[k].shape) for k in keys}
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in keys}


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
