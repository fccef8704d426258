"""Mix-of-Show's ED-LoRA layer-wise embeddings: every concept word has one embedding per UNet
cross-attention layer.

How it is wired (the layout is Mix-of-Show's, the code ours):

- Word w gets L new tokens, ``layer_token(w, i)`` for i < L, where L is the number of
  cross-attention layers, counted from the model in Mix-of-Show's order (down blocks, mid
  block, up blocks; 16 in SD 1.5).
- A prompt is copied L times; copy i has every concept word replaced by its i-th token. The
  text encoder reads the B x L copies in one batch, and the result is laid out flat,
  (B, L * T, D) with T the tokenizer's length, so stock pipelines carry it as
  ``prompt_embeds`` unchanged. Mix-of-Show's (B, L, T, D) is read too.
- Each cross-attention module gets a ``LayerwiseAttnProcessor`` (diffusers' processor API, no
  patched forward) that hands the module its own slice i and then runs the processor it had.
  A plain (B, T, D) context is shared by every layer, which is how the negative prompt and
  runs without layer-wise words are read: a UNet with these processors and a plain context
  computes exactly what it computed before.

The words in use are kept on the UNet (``set_layer_words``): the comparer switches them per
run, sampling reads them to decide how to encode a prompt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from .tokens import set_token_embeddings, tokenize

# the attribute of the UNet that holds the layer-wise words in use
_WORDS_ATTR = "sai_layer_words"


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention modules, in Mix-of-Show's order: down blocks, mid block, up
    blocks, each in module order. ``(qualified name, module)``; counted from the model."""
    found = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        root = getattr(unet, part, None)
        if root is None:
            continue
        for name, module in root.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                found.append((f"{part}.{name}", module))
    return found


def layer_token(word: str, layer: int) -> str:
    """The token of ``word`` read by cross-attention layer ``layer``: ``<Vpotter1>@3``."""
    return f"{word}@{layer}"


def layer_tokens(word: str, layers: int) -> list[str]:
    return [layer_token(word, i) for i in range(layers)]


class LayerwiseAttnProcessor:
    """Give one cross-attention layer its own part of a layer-wise context, then run ``inner``
    (the processor the module had). A context of ``tokens`` positions is shared by all layers.

    With ``record`` set (a list), the layer also computes its attention probabilities itself
    and appends ``(index, probs)``, probs (B, heads, Q, T): attention regularisation reads them.
    """

    def __init__(self, index: int, layers: int, tokens: int, inner) -> None:
        self.index, self.layers, self.tokens, self.inner = index, layers, tokens, inner
        self.record: list[tuple[int, torch.Tensor]] | None = None

    def select(self, context: torch.Tensor) -> torch.Tensor:
        if context.dim() == 4:  # Mix-of-Show's (B, L, T, D)
            if context.shape[1] != self.layers:
                raise ValueError(
                    f"layer-wise context has {context.shape[1]} layers, the UNet {self.layers}"
                )
            return context[:, self.index]
        if context.shape[1] == self.tokens:
            return context  # plain: the same for every layer
        if context.shape[1] != self.layers * self.tokens:
            raise ValueError(
                f"context of {context.shape[1]} positions: expected {self.tokens} (plain) or "
                f"{self.layers} x {self.tokens} (layer-wise)"
            )
        start = self.index * self.tokens
        return context[:, start : start + self.tokens]

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            encoder_hidden_states = self.select(encoder_hidden_states)
        if self.record is not None and encoder_hidden_states is not None:
            return self._recorded(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                          *args, **kwargs)  # fmt: skip

    def _recorded(self, attn, hidden_states, context, attention_mask, temb) -> torch.Tensor:
        """diffusers' AttnProcessor (explicit softmax), keeping the probabilities."""
        probes: list[torch.Tensor] = []
        original = attn.get_attention_scores

        def scores(query, key, mask=None):
            probs = original(query, key, mask)  # (B * heads, Q, T)
            probes.append(probs)
            return probs

        attn.get_attention_scores = scores  # an instance attribute, removed below
        try:
            out = AttnProcessor()(attn, hidden_states, context, attention_mask, temb)
        finally:
            del attn.get_attention_scores
        (probs,) = probes
        batch = hidden_states.shape[0]
        self.record.append((self.index, probs.unflatten(0, (batch, attn.heads))))
        return out


def install_processors(unet: nn.Module, tokens: int) -> list[str]:
    """Give every cross-attention layer a ``LayerwiseAttnProcessor`` (again: only its counts
    change); return the layer names in order.

    Raises:
        UserError: the UNet has no cross-attention layers.
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise UserError(
            "edlora=true needs a UNet with cross-attention layers (attn2) and this base model "
            "has none; train with --set edlora=false"
        )
    for index, (_, module) in enumerate(layers):
        inner = module.processor
        if isinstance(inner, LayerwiseAttnProcessor):
            inner = inner.inner
        module.set_processor(LayerwiseAttnProcessor(index, len(layers), tokens, inner))
    return [name for name, _ in layers]


def processors(unet: nn.Module) -> list[LayerwiseAttnProcessor]:
    return [
        m.processor
        for _, m in cross_attention_layers(unet)
        if isinstance(m.processor, LayerwiseAttnProcessor)
    ]


@dataclass(frozen=True)
class LayerWords:
    """The layer-wise words in use: word -> its L tokens."""

    tokens: Mapping[str, Sequence[str]]
    layers: int

    @functools.cached_property
    def _pattern(self) -> re.Pattern:
        # one pass, longest word first: "sks" must not rewrite "sksdog" or its layer token
        words = sorted(self.tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, words)))

    def bind(self, prompt: str, layer: int) -> str:
        """``prompt`` as layer ``layer`` reads it: each word replaced by its layer token."""
        return self._pattern.sub(lambda m: self.tokens[m[0]][layer], prompt)

    def uses(self, prompt: str) -> bool:
        return self._pattern.search(prompt) is not None


def set_layer_words(unet: nn.Module, words: LayerWords | None) -> None:
    setattr(unet, _WORDS_ATTR, words)


def layer_words(unet: nn.Module) -> LayerWords | None:
    return getattr(unet, _WORDS_ATTR, None)


def encode_layerwise(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    words: LayerWords | None,
    *,
    device: torch.device | str,
) -> torch.Tensor:
    """The context of ``prompts`` for a UNet with layer-wise processors: (B, L * T, D), every
    layer's copy encoded in one batched call; (B, T, D), shared by all layers, when no prompt
    names a layer-wise word (or ``words`` is None)."""
    if words is None or not any(words.uses(p) for p in prompts):
        return text_encoder(tokenize(tokenizer, list(prompts)).to(device))[0]
    copies = [words.bind(p, i) for p in prompts for i in range(words.layers)]
    hidden = text_encoder(tokenize(tokenizer, copies).to(device))[0]  # (B * L, T, D)
    batch, tokens = len(prompts), hidden.shape[1]
    return hidden.reshape(batch, words.layers * tokens, hidden.shape[-1])


def spread(context: torch.Tensor, layers: int) -> torch.Tensor:
    """A plain (B, T, D) context laid out for every layer: (B, L * T, D)."""
    return context.repeat(1, layers, 1)


def add_layerwise_tokens(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: nn.Module,
    words: Sequence[str],
    layers: int,
) -> list[int]:
    """Add each word's L layer tokens, every row a copy of the word's own row (so all layers
    start equal, as Mix-of-Show initialises them); return the ids, word-major."""
    vocab = tokenizer.get_vocab()
    missing = [w for w in words if w not in vocab]
    if missing:
        raise ValueError(f"words {missing} are not in the tokenizer: add them first")
    names = [t for w in words for t in layer_tokens(w, layers)]
    taken = [t for t in names if t in vocab]
    if taken:
        raise UserError(f"layer-wise tokens {taken[:3]} are already in the tokenizer's vocabulary")
    trainable = text_encoder.get_input_embeddings().weight.requires_grad
    tokenizer.add_tokens(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(names)
    with torch.no_grad():
        for w in words:
            source = weight[vocab[w]].clone()
            for t in layer_tokens(w, layers):
                weight[tokenizer.convert_tokens_to_ids(t)] = source
    weight.requires_grad_(trainable)
    return ids


def vectors_by_token(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{word: (L, D)}`` as ``{layer token: (D,)}``."""
    return {layer_token(w, i): rows[i] for w, rows in vectors.items() for i in range(len(rows))}


def check_layers(unet: nn.Module, names: Sequence[str], where: str) -> None:
    """A file's layer order must be this UNet's."""
    ours = [name for name, _ in cross_attention_layers(unet)]
    if list(names) != ours:
        raise UserError(
            f"{where} holds embeddings for {len(names)} cross-attention layers "
            f"({names[0] if names else 'none'}, ...) but this base model has {len(ours)} "
            f"({ours[0] if ours else 'none'}, ...): it was trained on another architecture"
        )


def apply_layerwise(
    pipe, vectors: Mapping[str, torch.Tensor], names: Sequence[str], *, where: str
) -> LayerWords:
    """The processors, the layer tokens with their vectors (an already-added token keeps its
    id and gets the new rows: one pipeline switches between runs), and the words made the ones
    in use; returns the words. ``where`` names the vectors' file in messages."""
    check_layers(pipe.unet, names, where)
    install_processors(pipe.unet, pipe.tokenizer.model_max_length)
    set_token_embeddings(pipe, vectors_by_token(vectors))
    words = LayerWords({w: layer_tokens(w, len(names)) for w in vectors}, len(names))
    set_layer_words(pipe.unet, words)
    return words
