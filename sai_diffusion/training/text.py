"""Captions into what the UNet is conditioned on, through the model family.

When the text encoder is frozen and every caption is known before training (no shuffled or
templated captions), each caption is encoded once and kept (``cache``). An ED-LoRA run
(``models.edlora``) encodes a caption once per cross-attention layer, each copy naming the
concept words by that layer's tokens, laid out (B, L * T, D).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..models import edlora
from ..models.family import StableDiffusion, TextEncoder
from ..models.tokens import tokenize
from .attention import word_positions


def _row(context, i: int):
    """Row ``i`` of a batch's context (a tensor, or a ``PooledContext`` of tensors), on the CPU."""
    if isinstance(context, tuple):
        return type(context)(*(part[i].cpu() for part in context))
    return context[i].cpu()


def _stack(rows: Sequence, device):
    """The batch of ``rows`` (``_row``'s) on ``device``."""
    if isinstance(rows[0], tuple):
        return type(rows[0])(*(torch.stack(parts).to(device) for parts in zip(*rows, strict=True)))
    return torch.stack(rows).to(device)


class CaptionEncoder:
    """``encoder(captions)`` -> the UNet's context (B, T, D), or (B, L * T, D) for ED-LoRA, or an
    SDXL-class model's ``PooledContext`` (the family's ``encode``).

    ``words``: an ED-LoRA run's layer-wise words (None for a plain run).
    """

    def __init__(
        self,
        family: StableDiffusion,
        encoders: Sequence[TextEncoder],
        *,
        device,
        words: edlora.LayerWords | None = None,
    ) -> None:
        self.family, self.encoders, self.device, self.words = family, list(encoders), device, words
        self._cached: dict[str, torch.Tensor] = {}

    @property
    def tokenizer(self):
        return self.encoders[0].tokenizer

    def cache(self, captions: Iterable[str]) -> None:
        """Encode ``captions`` now, one at a time, and read them from memory from then on."""
        with torch.no_grad():
            for caption in sorted(set(captions)):
                self._cached[caption] = _row(self._encode([caption]), 0)

    @property
    def cached(self) -> frozenset[str]:
        """The captions read from memory (none when the text encoder trains)."""
        return frozenset(self._cached)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        if self._cached:
            return _stack([self._cached[c] for c in captions], self.device)
        return self._encode(captions)

    def _encode(self, captions: Sequence[str]) -> torch.Tensor:
        if self.words is None:
            return self.family.encode(self.encoders, captions, device=self.device)
        (encoder,) = self.encoders
        context = edlora.encode_layerwise(encoder.tokenizer, encoder.module, captions,
                                          self.words, device=self.device)  # fmt: skip
        plain = context.shape[1] == self.tokenizer.model_max_length  # no caption has words
        # laid out for every layer all the same, so cached captions stack with the others
        return edlora.spread(context, self.words.layers) if plain else context

    def word_positions(self, captions: Sequence[str], words: Sequence[str]) -> torch.Tensor:
        """(B, W): where each of ``words`` first stands in each caption as the first
        cross-attention layer reads it (-1 where a caption lacks it)."""
        if self.words is not None:
            captions = [self.words.bind(c, 0) for c in captions]
            words = [self.words.tokens[w][0] for w in words]
        ids = tokenize(self.tokenizer, list(captions)).to(self.device)
        return word_positions(ids, self.tokenizer.convert_tokens_to_ids(list(words)))
