"""Mix-of-Show's files: an ED-LoRA run's layer-wise embeddings, and the export to Mix-of-Show's
own checkpoint layout.

    edlora.safetensors   ``{word: (L, D)}``, one row per UNet cross-attention layer in
                         Mix-of-Show's order; the header names the words (``words``, JSON list,
                         their order in the concept) and the layers (``layers``, JSON list of
                         the attn2 module names, row i = layer i).

    sai-export --format mix-of-show   ``{'params': {'new_concept_embedding': {word: (L, D)},
                                      'text_encoder': {...}, 'unet': {...}}}``, the layout of
                                      Mix-of-Show's ``edlora_model-latest.pth``, which its
                                      inference and gradient fusion read

``edlora.safetensors`` is not a textual-inversion file on purpose: A1111 and diffusers would read an (L, D) tensor
as L consecutive tokens, so an ED-LoRA run writes no ``embeddings.safetensors``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..errors import UserError
from ..fsutil import atomic_path
from .lora_files import atomic_save_tensors, parse_diffusers_key, read_embeddings
from .run_dir import RunDir

EDLORA_FORMAT = "sai-edlora/1"


def save_edlora(
    path: Path,
    vectors: Mapping[str, torch.Tensor],
    *,
    layers: Sequence[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``edlora.safetensors``: ``vectors`` ``{word: (L, D)}`` with L = len(layers)."""
    for word, rows in vectors.items():
        if rows.dim() != 2 or rows.shape[0] != len(layers):
            raise ValueError(f"{word}: expected ({len(layers)}, D) rows, got {tuple(rows.shape)}")
    header = {
        **(metadata or {}),
        "format": "pt",
        "sai_format": EDLORA_FORMAT,
        "words": json.dumps(list(vectors)),
        "layers": json.dumps(list(layers)),
    }
    tensors = {w: rows.detach().float().cpu().contiguous() for w, rows in vectors.items()}
    atomic_save_tensors(tensors, Path(path), header)
    return Path(path)


def read_edlora(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """``({word: (L, D)}, layer names)`` of an ED-LoRA run; None for a plain run.

    Raises:
        UserError: the file is unreadable or inconsistent.
    """
    path = RunDir(run_dir).edlora
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            words, layers = json.loads(header["words"]), json.loads(header["layers"])
            vectors = {w: f.get_tensor(w) for w in words}
    except (safetensors.SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path} is not a readable ED-LoRA embeddings file ({e}); train the run again or "
            "restore the file"
        ) from None
    bad = [w for w, rows in vectors.items() if tuple(rows.shape[:1]) != (len(layers),)]
    if bad:
        raise UserError(f"{path}: {bad[0]!r} does not have one row per layer ({len(layers)})")
    return vectors, layers


# ----------------------------------------------------------------------- Mix-of-Show's .pth


def mix_of_show_params(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A finished run as Mix-of-Show's ``params``: ``new_concept_embedding`` ``{word: (L, D)}``
    and the ``text_encoder`` / ``unet`` LoRA factors under its names
    (``<module>.lora_down.weight``, ``.lora_up.weight``), the up factors carrying the trained
    strength, so that Mix-of-Show's merge ``W + alpha * up @ down`` at alpha 1.0 (its fusion
    configs' ``unet_alpha`` / ``text_encoder_alpha``) is the trained model.

    A plain run's vector is repeated for every cross-attention layer (an ED-LoRA whose rows
    are equal is exactly the plain model), L counted from the LoRA's attn2 modules.

    Raises:
        UserError: an unfinished run, unreadable files, or a plain run whose LoRA names no
            cross-attention module (L unknown).
    """
    run = RunDir(run_dir)
    if not run.lora.is_file():
        raise UserError(
            f"{run.lora} not found: {run.path} is not a finished sai-train-lora run; finish it "
            f"with sai-train-lora --resume {run.path}"
        )
    try:
        lora = safetensors.torch.load_file(run.lora)
        with safetensors.safe_open(run.lora, framework="pt") as f:
            version = (f.metadata() or {}).get("ss_base_model_version", "sd_v1")
    except (safetensors.SafetensorError, OSError) as e:
        raise UserError(f"{run.lora} is not readable ({e}); train the run again") from None
    if version != "sd_v1":  # SD 2.x (sd_v2), SDXL (sdxl_base_v1-0)
        raise UserError(
            f"{run.path} was trained on a {version} model; Mix-of-Show is built on SD 1.x and "
            f"loads SD 1.x LoRA only. Use {run.kohya.name} (ComfyUI, A1111, kohya) or "
            f"{run.lora.name} (diffusers) instead"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {"text_encoder": {}, "unet": {}}
    for key, tensor in lora.items():
        if key.endswith(".lora_magnitude_vector") or tensor.dim() != 2:
            what = "DoRA (use_dora)" if tensor.dim() < 4 else "conv LoRA (LoCon)"
            raise UserError(
                f"{run.lora} holds {what} layers ({key}); Mix-of-Show's loader merges plain "
                "LoRA on Linear layers only. Export a run trained without them, or use its "
                f"{run.kohya.name} in ComfyUI"
            )
        try:  # ours (alpha folded into up) -> Mix-of-Show's <module>.lora_down.weight
            part, module, side = parse_diffusers_key(key)
        except ValueError:
            part = None
        if part not in parts:
            raise UserError(f"{run.lora}: key {key!r} is not one of this project's LoRA keys")
        parts[part][f"{module}.lora_{side}.weight"] = tensor
    found = read_edlora(run.path)
    if found is not None:
        embeddings = found[0]
    else:
        attn2 = {k.split(".attn2.")[0] for k in parts["unet"] if ".attn2." in k}
        if not attn2:
            raise UserError(
                f"{run.lora} has no cross-attention (attn2) LoRA, so the number of layer-wise "
                "embeddings Mix-of-Show expects is unknown; export an ED-LoRA run instead"
            )
        vectors = read_embeddings(run.path)
        if not vectors:  # every run writes its words; without them the export lacks the concept
            raise UserError(f"{run.embeddings} not found: it holds the run's words ({run.path} "
                            "is incomplete); restore the file or train the run again")  # fmt: skip
        embeddings = {w: v.reshape(1, -1).repeat(len(attn2), 1) for w, v in vectors.items()}
    return {"new_concept_embedding": embeddings, **parts}


def export_mix_of_show(run_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write ``{'params': mix_of_show_params(run_dir)}`` with torch.save (Mix-of-Show's
    ``edlora_model-latest.pth`` layout), atomically. Mix-of-Show's loaders assume SD 1.5's 16
    cross-attention layers and words written ``<...>``: a run of another shape is written all
    the same (for other readers) with a warning on stderr.

    Raises:
        UserError: see ``mix_of_show_params``; ``out`` is a folder, a file inside the run
            folder (never replaced), or an existing file without ``overwrite``.
    """
    out = Path(out)
    _check_out(RunDir(run_dir), out, overwrite=overwrite)
    params = mix_of_show_params(run_dir)
    for word, rows in params["new_concept_embedding"].items():
        if rows.shape[0] != 16 or not (word.startswith("<") and word.endswith(">")):
            print(
                f"warning: {word!r} has {rows.shape[0]} layer rows; Mix-of-Show's loaders read "
                "16 per word (SD 1.5) and words written <...>",
                file=sys.stderr,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save({"params": params}, tmp)
    return out


def _check_out(run: RunDir, out: Path, *, overwrite: bool) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the name of the file to write")
    if not out.exists():
        return
    if out.resolve().is_relative_to(run.path.resolve()):  # RUN/../RUN/lora.safetensors too
        name = run.path.resolve().name
        raise UserError(
            f"--out {out} is inside the run folder {run.path}, and sai-export never replaces a "
            f"run's files; write the export elsewhere, e.g. --out {name}.pth"
        )
    if not overwrite:
        raise UserError(f"--out {out} exists; pass --force to replace it, or give a new name")
