"""Concept tokens: new words in the tokenizer with their own embedding rows, trained as one
small parameter, and prompts turned into token ids.

Training the whole (49408, 768) token-embedding matrix to move a few rows wastes memory, and
under SGD-SaI it would give the block a g-SNR computed over mostly-zero rows. Instead the new
rows live in one (n_tokens, dim) parameter that overrides the lookup of their ids
(``ConceptTokenEmbedding``), folded back into the table before saving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import random_init_std
from ..errors import UserError


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Token ids (B, 77) as SD's text encoder reads them: padded to the tokenizer's length,
    longer prompts cut."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def add_concept_tokens(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: nn.Module,
    tokens: list[str],
    *,
    init_word: str | Sequence[str],
    init_noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Add ``tokens`` to the tokenizer and give each a new embedding row; return their ids.

    ``init_word`` is one initialiser for every token, or one per token. A plain word gives its
    embedding (a word of several tokens: the mean of theirs, except in a list of several),
    plus Gaussian noise of std ``init_noise_std`` when > 0 (Mix-of-Show starts concept tokens
    from the class word plus a small random vector); ``<rand-S>`` gives a random N(0, S^2)
    vector. Random draws come from ``generator``. The embedding weight keeps its requires_grad
    flag.

    Raises:
        UserError: a token is already in the vocabulary or repeated, an initialiser gives no
            token, or one of several per-token initialisers is more than one token.
    """
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token in vocab:
            raise UserError(
                f"Concept token {token!r} is already in the tokenizer's vocabulary, so training "
                f"it would change an existing word. Pick a new token, e.g. '<{token.strip('<>')}1>'."
            )
    if len(set(tokens)) != len(tokens):
        raise UserError(f"Concept tokens repeat: {tokens}. Give each concept its own token.")
    inits = [init_word] * len(tokens) if isinstance(init_word, str) else list(init_word)
    if len(inits) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(inits)} initialisers: {inits}")

    embedding = text_encoder.get_input_embeddings()
    trainable = embedding.weight.requires_grad
    start = embedding.weight.shape[0]
    table = embedding.weight.detach()
    # one initialiser per word (Mix-of-Show's notation) must name one token each
    per_word = not isinstance(init_word, str) and len(tokens) > 1
    starts = [_initial_row(tokenizer, table, init, several=per_word) for init in inits]

    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if min(ids) < start:  # the tokenizer and the embedding disagreed on the vocabulary size
        raise ValueError(f"New token ids {ids} overlap the existing {start} embedding rows.")
    # mean_resizing=False: its covariance over the whole (49408, 768) table is wasted work,
    # every new row is overwritten below.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight  # a new tensor after the resize
    noise_device = generator.device if generator is not None else "cpu"
    with torch.no_grad():
        for token_id, (row, random_std) in zip(ids, starts, strict=True):
            std = random_std if random_std is not None else init_noise_std
            if std > 0:
                noise = torch.randn(row.shape, generator=generator, device=noise_device)
                row = row + std * noise.to(row.device)
            weight[token_id] = row.to(weight.dtype)
    weight.requires_grad_(trainable)
    return ids


def _initial_row(
    tokenizer: PreTrainedTokenizerBase, table: torch.Tensor, initialiser: str, *, several: bool
) -> tuple[torch.Tensor, float | None]:
    """(start row (dim,), the std of its random part: S of <rand-S>, None for a word)."""
    std = random_init_std(initialiser)
    if std is not None:
        return torch.zeros(table.shape[1], dtype=torch.float32, device=table.device), std
    ids = tokenizer(initialiser, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(
            f"The init word {initialiser!r} tokenises to nothing. Set `class_word` in the "
            "concept config to a real word (e.g. 'man', 'dog')."
        )
    if several and len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UserError(
            f"The class_word initialiser {initialiser!r} is {len(ids)} tokens for this "
            f"tokenizer ({' '.join(pieces)}); with several concept words each needs a word "
            "the tokenizer keeps whole (or <rand-S>): pick another class word"
        )
    return table[ids].float().mean(dim=0), None


def set_token_embeddings(
    pipe: StableDiffusionPipeline, vectors: Mapping[str, torch.Tensor]
) -> None:
    """Make ``pipe``'s text encoder(s) read each token of ``vectors`` as that vector.

    With two text encoders (SDXL) a token's vector is its two rows side by side, the first
    encoder's then the second's (``files.lora_files.read_embeddings``). A token a tokenizer
    lacks is added (as ``load_textual_inversion`` would, without its covariance over the whole
    table); a token it already has (added for another run of the same concept) keeps its id
    and only its row is overwritten, so one pipeline can switch between runs. Other rows are
    untouched.

    Raises:
        UserError: a vector's width differs from the text encoders' (another base model).
    """
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    widths = [enc.get_input_embeddings().weight.shape[-1] for _, enc in pairs]
    for token, vector in vectors.items():
        if vector.shape[-1] != sum(widths):
            raise UserError(
                f"The embedding of {token!r} has width {vector.shape[-1]}, the base model's text "
                f"encoder(s) {' + '.join(map(str, widths))}: the run was trained on another "
                "base model."
            )
    start = 0
    for (tokenizer, encoder), width in zip(pairs, widths, strict=True):
        part = {t: v[..., start : start + width] for t, v in vectors.items()}
        _set_rows(tokenizer, encoder, part)
        start += width


def _set_rows(tokenizer, text_encoder, vectors: Mapping[str, torch.Tensor]) -> None:
    vocab = tokenizer.get_vocab()
    new = [t for t in vectors if t not in vocab]
    if new:
        tokenizer.add_tokens(new)
        # mean_resizing=False: every new row is overwritten below
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight  # resized: a new tensor
    ids = tokenizer.convert_tokens_to_ids(list(vectors))
    with torch.no_grad():
        for token_id, vector in zip(ids, vectors.values(), strict=True):
            weight[token_id] = vector.to(weight.device, weight.dtype)


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
