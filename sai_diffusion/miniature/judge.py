"""The judge: a small CNN that reads a miniature-world image back into its scene.

One convolutional trunk and four heads: object, colour, background and style (``world.py``'s
vocabularies). It is trained on procedural images only, where the truth is known by
construction (``scripts/train_judge.py``), with blur, noise and colour jitter so that it also
reads the imperfect images a tiny diffusion model makes. Shipped as
``configs/judge/judge.safetensors`` (the label lists ride in the file's metadata); its
accuracy on held-out images is in ``configs/judge/report.json``.

    judge = Judge.load()
    judge.predict([image])
    # [{"object": "star", "object_prob": 0.99, "colour": "red", "colour_prob": 0.98,
    #   "background": "blue", "background_prob": 0.99, "style": "photo", "style_prob": 1.0}]

Images of any square size from 16 px are box-resized to 32 px. A pencil sketch has no colour
or background: for an image judged a sketch both are reported as None. Besides the world's
objects the object head knows ``"nothing"`` (a bare background or blank paper, learnt from
``world.render_empty``), so an image without any object is not forced into a shape; its
colour is None, and for blank paper or a bare white background its style is a guess (the two
look alike and were not labelled).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._resources import configs_dir
from ..errors import UserError
from ..fsutil import atomic_write_with
from . import world

__all__ = [
    "FORMAT",
    "HEADS",
    "INPUT_SIZE",
    "MIN_SIZE",
    "NOTHING",
    "Judge",
    "JudgeNet",
    "accuracy",
    "default_judge_path",
    "images_to_tensor",
    "to_input_array",
    "uint8_to_input",
    "world_labels",
]

FORMAT = "sai-diffusion-judge/1"
HEADS = ("object", "colour", "background", "style")
INPUT_SIZE = 32  # enough to tell the shapes apart; 4x cheaper than 64 px
MIN_SIZE = 16
NOTHING = "nothing"  # the object label of an image without an object
_PHOTO_ONLY = ("colour", "background")  # heads that do not apply to a sketch


def world_labels() -> dict[str, tuple[str, ...]]:
    """The label list of every head, in ``HEADS`` order: the world's vocabularies, and
    ``NOTHING`` after the objects."""
    return {
        "object": (*world.OBJECTS, NOTHING),
        "colour": world.COLOURS,
        "background": world.BACKGROUNDS,
        "style": world.STYLES,
    }


def default_judge_path() -> Path:
    """The shipped judge, ``configs/judge/judge.safetensors``."""
    return configs_dir() / "judge" / "judge.safetensors"


# ------------------------------------------------------------------------------ network
class JudgeNet(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU and a 2x2 max-pool, global average pooling, one
    linear head per attribute. With widths (24, 48, 96): 165 k parameters, 0.66 MB fp32."""

    def __init__(self, num_classes: Mapping[str, int], widths: Sequence[int] = (24, 48, 96)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(channels, n) for name, n in num_classes.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x).mean(dim=(2, 3))  # (B, 3, 32, 32) -> (B, C, 4, 4) -> (B, C)
        return {name: head(features) for name, head in self.heads.items()}


# ------------------------------------------------------------------------------ inputs
def to_input_array(image: Image.Image) -> np.ndarray:
    """One image as the judge sees it: (32, 32, 3) uint8 RGB, box-resized.

    Raises:
        TypeError: not a PIL image.
        ValueError: not square, or smaller than 16 px.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"The judge reads PIL images, got {type(image).__name__}; convert arrays with "
            "PIL.Image.fromarray(array) (uint8, H x W x 3)."
        )
    width, height = image.size
    if width != height:
        raise ValueError(
            f"The judge reads square images (the world's and the sampler's), got {width}x{height}; "
            "crop or pad it to a square first."
        )
    if width < MIN_SIZE:
        raise ValueError(f"The judge needs images of at least {MIN_SIZE} px, got {width}x{height}.")
    image = image.convert("RGB")
    if width != INPUT_SIZE:
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BOX)
    return np.asarray(image, dtype=np.uint8)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, 32, 32) float32 in [-1, 1].

    Raises:
        TypeError: ``images`` is one image rather than a list of them, or an item is not a
            PIL image.
        ValueError: an image is not square or is smaller than 16 px.
    """
    if isinstance(images, Image.Image):
        raise TypeError("Pass a list of images, e.g. judge.predict([image]), not one image.")
    arrays = []
    for i, image in enumerate(images):
        try:
            arrays.append(to_input_array(image))
        except (TypeError, ValueError) as e:
            raise type(e)(f"images[{i}]: {e}") from None
    if not arrays:
        return torch.empty(0, 3, INPUT_SIZE, INPUT_SIZE)
    return uint8_to_input(torch.from_numpy(np.stack(arrays)))


def describe(prediction: Mapping) -> str:
    """'red star on blue (photo)' or 'star (sketch)': a ``Judge.predict`` verdict as text."""
    if prediction["style"] == world.SKETCH:
        return f"{prediction['object']} (sketch)"
    return f"{prediction['colour']} {prediction['object']} on {prediction['background']} (photo)"


def uint8_to_input(batch: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]: the judge's normalisation."""
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# ------------------------------------------------------------------------------ the judge
class Judge:
    """A trained ``JudgeNet`` with its label lists; ``predict`` turns images into scenes."""

    def __init__(self, net: JudgeNet, labels: Mapping[str, Sequence[str]]):
        self.net = net.eval()
        self.labels = {name: tuple(labels[name]) for name in HEADS}

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        """Load a judge file; ``None`` loads the shipped one.

        Raises:
            UserError: the file is missing, is not a judge file, or does not match the
                network it describes.
        """
        path = Path(path) if path is not None else default_judge_path()
        retrain = "re-create it with `python scripts/train_judge.py` (writes configs/judge/)"
        if not path.is_file():
            raise UserError(f"Judge file {path} does not exist; {retrain}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types on a corrupt header
            raise UserError(
                f"Judge file {path} is not a readable safetensors file ({e}); {retrain}."
            ) from None
        if metadata.get("format") != FORMAT:
            raise UserError(
                f"{path} is not a judge file (format {metadata.get('format')!r}, expected "
                f"{FORMAT!r}); {retrain}."
            )
        try:
            labels = json.loads(metadata["labels"])
            net = JudgeNet(
                {name: len(labels[name]) for name in HEADS}, json.loads(metadata["widths"])
            )
            net.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(
                f"Judge file {path} does not match its network ({e}); {retrain}."
            ) from None
        return cls(net, labels)

    def save(self, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> Path:
        """Write weights and labels to ``path`` (safetensors, written whole or not at all)."""
        widths = [m.out_channels for m in self.net.trunk if isinstance(m, nn.Conv2d)][1::2]
        metadata = {
            **(extra_metadata or {}),
            "format": FORMAT,
            "labels": json.dumps(self.labels),
            "widths": json.dumps(widths),
            "input_size": str(INPUT_SIZE),
        }
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        path = Path(path)
        atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        return path

    @torch.no_grad()
    def scores(
        self, images: Sequence[Image.Image], *, batch_size: int = 256
    ) -> dict[str, torch.Tensor]:
        """Per head, the probability of every label: ``{head: (N, num_labels)}``.

        Raises: as ``images_to_tensor``.
        """
        x = images_to_tensor(images)
        if len(x) == 0:
            return {name: torch.empty(0, len(self.labels[name])) for name in HEADS}
        self.net.eval()
        chunks = [self.net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return {name: torch.cat([c[name] for c in chunks]).softmax(dim=1) for name in HEADS}

    def predict(self, images: Sequence[Image.Image], *, batch_size: int = 256) -> list[dict]:
        """Per image: ``{head: label, head + "_prob": probability}`` for the four heads, with
        colour and background (and their probabilities) None for an image judged a sketch,
        and colour None for one judged to show ``NOTHING``.

        Raises: as ``images_to_tensor``.
        """
        probs = self.scores(images, batch_size=batch_size)
        best = {name: p.max(dim=1) for name, p in probs.items()}
        results = []
        for i in range(len(images)):
            result = {}
            for name in HEADS:
                result[name] = self.labels[name][int(best[name].indices[i])]
                result[f"{name}_prob"] = float(best[name].values[i])
            not_applicable = _PHOTO_ONLY if result["style"] == world.SKETCH else ()
            if result["object"] == NOTHING:
                not_applicable = (*not_applicable, "colour")
            for name in not_applicable:
                result[name] = result[f"{name}_prob"] = None
            results.append(result)
        return results


def accuracy(predictions: Sequence[Mapping], scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Fraction right per head. Object and style count every image; colour and background
    count the photos only (a photo judged a sketch is wrong on both)."""
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} predictions for {len(scenes)} scenes.")
    result = {}
    for name in HEADS:
        pairs = [
            (p[name], getattr(s, name))
            for p, s in zip(predictions, scenes, strict=True)
            if name not in _PHOTO_ONLY or s.style == world.PHOTO
        ]
        result[name] = sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
    return result
