"""Trainable concept-token embeddings as their own small parameter.

Training the whole (49408, 768) token-embedding matrix to move a few rows wastes memory, and
under SGD-SaI it would give the block a g-SNR computed over mostly-zero rows. Instead the new
rows live in one (n_tokens, dim) parameter that overrides the lookup of their ids.
"""

from __future__ import annotations

import torch
from torch import nn


class ConceptTokenEmbedding(nn.Module):
    """Wraps a frozen ``nn.Embedding``; the rows of ``token_ids`` come from ``vectors``."""

    def __init__(self, base: nn.Embedding, token_ids: list[int]) -> None:
        super().__init__()
        self.base = base
        self.register_buffer(
            "token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False
        )
        self.vectors = nn.Parameter(base.weight[token_ids].detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for shapes and dtype
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)  # (B, T, D)
        match = input_ids.unsqueeze(-1) == self.token_ids.to(input_ids.device)  # (B, T, n)
        if not match.any():
            return out
        which = match.float().argmax(-1)  # (B, T): index into vectors where matched
        found = match.any(-1, keepdim=True)  # (B, T, 1)
        return torch.where(found, self.vectors[which].to(out.dtype), out)

    def bake(self) -> None:
        """Write the trained vectors into the base matrix (for saving and stock pipelines)."""
        with torch.no_grad():
            self.base.weight[self.token_ids] = self.vectors.to(self.base.weight.dtype)


def make_token_embeddings_trainable(text_encoder, token_ids: list[int]) -> ConceptTokenEmbedding:
    embeddings = text_encoder.get_input_embeddings()
    if isinstance(embeddings, ConceptTokenEmbedding):
        return embeddings
    wrapper = ConceptTokenEmbedding(embeddings, token_ids)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def bake_token_embeddings(text_encoder) -> None:
    """Fold a ConceptTokenEmbedding back into a plain nn.Embedding (no-op otherwise)."""
    embeddings = text_encoder.get_input_embeddings()
    if isinstance(embeddings, ConceptTokenEmbedding):
        embeddings.bake()
        text_encoder.set_input_embeddings(embeddings.base)
