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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor

from ..errors import UserError, first_line

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"


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
