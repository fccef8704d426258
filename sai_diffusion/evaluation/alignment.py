"""Text and image alignment of generated images, as the customization literature measures a
concept (shared/REFERENCES.md section 7):

- ``clip_t``: the CLIP cosine between each image and its prompt, with the concept words
  replaced by the class word (what the text tower reads never contains a new token); reported
  raw and as Mix-of-Show's ``2.5 * max(cos, 0)`` (``clip_t_mos``), each averaged over images;
- ``clip_i``: the mean CLIP image-image cosine over all (generated, training image) pairs;
- ``dino``: the same with a DINO ViT's class token.

Models load with transformers from a hub id or a local folder, each read through its own
processor (resize, crop, normalisation as the model's folder says). Defaults: Mix-of-Show's
CLIP ViT-B/32 and DreamBooth's DINO ViT-S/16.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor

from ..config import Concept
from ..errors import UserError, first_line
from .evaluator import Drawn, Rows, training_images

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
ALIGNMENT = ("clip_t", "clip_t_mos", "clip_i", "dino")


def _load(source: str, kind: str, flag: str, want: tuple[str, ...]):
    """(model, processor) of ``source`` (a folder or a hub id), in eval mode.

    Raises:
        UserError: not found offline, or not a model of the kind asked for.
    """
    local = Path(source).expanduser()
    where = str(local) if local.exists() else source
    missing = "" if local.exists() else " (no such folder, and no such model on a reachable hub)"
    try:
        model = AutoModel.from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"cannot load the {kind} model {source}{missing}: {first_line(exc)}; pass {flag} "
            f"DIR, a folder holding a transformers {kind} model and its processor"
        ) from None
    if type(model).__name__ not in want:
        raise UserError(
            f"{source} is a {type(model).__name__}, not a {kind} model ({' or '.join(want)}); "
            f"pass {flag} with a {kind} model folder or hub id"
        )
    try:
        processor = (AutoProcessor if kind == "CLIP" else AutoImageProcessor).from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{source} has no {kind} processor ({first_line(exc)}); save the model's processor "
            f"beside it (processor.save_pretrained(DIR)) or pass {flag} with a full model"
        ) from None
    return model.eval(), processor


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns the projected features inside an output object; 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class AlignmentModels:
    """The CLIP model (text and image towers) and, optionally, the DINO model."""

    clip: Any
    clip_processor: Any
    dino: Any = None
    dino_processor: Any = None
    clip_source: str = DEFAULT_CLIP
    dino_source: str | None = None

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, dino: str | None = DEFAULT_DINO) -> AlignmentModels:
        model, processor = _load(clip, "CLIP", "--clip-model", ("CLIPModel",))
        out = cls(model, processor, clip_source=clip)
        if dino is not None:
            out.dino, out.dino_processor = _load(
                dino, "DINO", "--dino-model", ("ViTModel", "Dinov2Model")
            )
            out.dino_source = dino
        return out

    @torch.no_grad()
    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit CLIP image embeddings."""
        inputs = self.clip_processor(images=list(images), return_tensors="pt")
        return _unit(_features(self.clip.get_image_features(pixel_values=inputs["pixel_values"])))

    @torch.no_grad()
    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit CLIP text embeddings (texts longer than the tower are cut)."""
        inputs = self.clip_processor(text=list(texts), return_tensors="pt", padding=True,
                                     truncation=True)  # fmt: skip
        out = self.clip.get_text_features(input_ids=inputs["input_ids"],
                                          attention_mask=inputs.get("attention_mask"))  # fmt: skip
        return _unit(_features(out))

    @torch.no_grad()
    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit DINO class-token embeddings."""
        inputs = self.dino_processor(images=list(images), return_tensors="pt")
        return _unit(self.dino(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def all_pairs_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine over every (row of ``a``, row of ``b``) pair of unit vectors."""
    return float((a @ b.T).mean())


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> tuple[float, float]:
    """(mean cos, mean 2.5 * max(cos, 0)) of image i with text i."""
    cos = (images * texts).sum(-1)
    return float(cos.mean()), float((2.5 * cos.clamp_min(0)).mean())


def alignment_scores(
    models: AlignmentModels,
    rows: Rows,
    references: Sequence[Image.Image],
    class_text: str,
) -> dict[str, Any]:
    """The figures of every prompt and over all, for the run and (``base_*``) the base model.
    CLIP-T reads each prompt with ``{token}`` said as ``class_text``."""
    ref_clip = models.clip_images(references)
    ref_dino = models.dino_images(references) if models.dino is not None else None
    per_prompt = []
    for prompt, images, base_images in rows:
        entry: dict[str, Any] = {"prompt": prompt}
        text = prompt.replace("{token}", class_text)
        for prefix, group in (("", images), ("base_", base_images)):
            if group is None:
                continue
            clip = models.clip_images(group)
            t, t_mos = text_alignment(clip, models.clip_texts([text] * len(group)))
            entry |= {f"{prefix}clip_t": t, f"{prefix}clip_t_mos": t_mos,
                      f"{prefix}clip_i": all_pairs_mean(clip, ref_clip)}  # fmt: skip
            if ref_dino is not None:
                entry[f"{prefix}dino"] = all_pairs_mean(models.dino_images(group), ref_dino)
        per_prompt.append(entry)
    keys = [k for k in per_prompt[0] if k != "prompt"]
    # every prompt has as many images: the overall mean is the mean of the prompts' means
    overall = {k: round(statistics.fmean(e[k] for e in per_prompt), 4) for k in keys}
    for entry in per_prompt:
        entry.update({k: round(entry[k], 4) for k in keys})
    return {
        **overall,
        "alignment": {
            "clip_model": models.clip_source,
            "dino_model": models.dino_source,
            "text": f"the prompt with {{token}} read as {class_text!r}",
            "references": len(references),
            "per_prompt": per_prompt,
        },
    }


class AlignmentScorer:
    """The evaluator's scorer of CLIP-T, CLIP-I and DINO (module docstring), beside the base
    model's (``base_*``); CLIP-T reads each prompt with ``{token}`` as the base model was asked."""

    headline = (*ALIGNMENT, *(f"base_{k}" for k in ALIGNMENT))

    def __init__(self, models: AlignmentModels) -> None:
        self.models = models

    def base_word(self, concept: Concept) -> str | None:
        return None

    def score(self, drawn: Drawn) -> dict[str, Any]:
        references = training_images(drawn.concept, drawn.run)
        return alignment_scores(self.models, drawn.rows, references, drawn.base_word)
