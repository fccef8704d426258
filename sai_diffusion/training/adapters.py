"""What a run adds to the base model and trains: the concept words (plain or layer-wise), the
LoRA adapters of the UNet and the text encoder, and the rule that stops the words' vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Concept, TrainConfig
from ..models import edlora
from ..models.family import StableDiffusion
from ..models.lora import add_lora
from ..models.tokens import add_concept_tokens, make_token_embeddings_trainable


@dataclass
class Adapters:
    """The trained parts of a run, on the base model's modules."""

    token_ids: list[int]  # the concept words' ids (an ED-LoRA run: every layer token's)
    trainable: dict[str, nn.Parameter]  # by name: "unet.<peft name>", "text_encoder.<...>"
    words: edlora.LayerWords | None = None  # an ED-LoRA run's layer-wise words
    # the cross-attention processors that record attention maps (attn_reg_weight > 0)
    attention: list[edlora.LayerwiseAttnProcessor] = field(default_factory=list)

    def param_groups(self, lrs: dict[str, float]) -> list[dict]:
        """Optimizer groups by name (``unet``, ``text_encoder``, ``embeddings``: the words'
        vectors), each with its lr of ``lrs`` (``TrainConfig.group_lrs``); empty ones left out."""
        groups: dict[str, list] = {"unet": [], "text_encoder": [], "embeddings": []}
        for name, p in self.trainable.items():
            group = "embeddings" if name.endswith(".vectors") else name.split(".")[0]
            groups[group].append((name, p))
        return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]

    @property
    def conv_pairs(self) -> bool:
        """LoRA on conv layers (LoCon): 4-D factors."""
        return any(".lora_A." in n and p.dim() > 2 for n, p in self.trainable.items())

    @property
    def vectors(self) -> nn.Parameter | None:
        """The concept words' trained vectors (embeddings.train), else None."""
        return next((p for n, p in self.trainable.items() if n.endswith(".vectors")), None)


def add_adapters(cfg: TrainConfig, concept: Concept, pipe, family: StableDiffusion) -> Adapters:
    """Add the concept's words and the LoRA adapters to ``pipe``'s modules; the trained tensors
    are fp32, the trained modules in train mode.

    Raises:
        UserError: a concept word already in the vocabulary, a LoRA target that matches nothing,
            a UNet without cross-attention for ED-LoRA.
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    emb, lora = cfg.embeddings, cfg.lora
    # The concept's words, initialised from the class word(s), before LoRA wraps the encoder.
    token_ids = add_concept_tokens(
        pipe.tokenizer,
        text_encoder,
        concept.words,
        init_word=concept.initialisers,
        init_noise_std=emb.init_noise_std,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    words = None
    if emb.edlora:  # each word's rows, one per cross-attention layer, start as the word's row
        layers = edlora.install_processors(unet, pipe.tokenizer.model_max_length)
        token_ids = edlora.add_layerwise_tokens(pipe.tokenizer, text_encoder, concept.words,
                                                len(layers))  # fmt: skip
        words = edlora.LayerWords({w: edlora.layer_tokens(w, len(layers)) for w in concept.words},
                                  len(layers))  # fmt: skip
        edlora.set_layer_words(unet, words)
    elif cfg.loss.attn_reg_weight > 0:  # the processors record attention; a plain context
        edlora.install_processors(unet, pipe.tokenizer.model_max_length)
    add_lora(
        unet,
        text_encoder if lora.text_encoder else None,
        rank=lora.rank,
        alpha=lora.alpha,
        unet_targets=tuple(lora.targets),
        text_encoder_targets=family.text_encoder_lora_targets,
        text_encoder_rank=lora.text_encoder_rank,
        text_encoder_alpha=lora.text_encoder_alpha,
        use_dora=lora.dora,
    )
    if emb.train:
        make_token_embeddings_trainable(text_encoder, token_ids)
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trainable |= {
        f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad
    }
    for p in trainable.values():  # only the adapters (and token vectors) train, in fp32
        p.data = p.data.float()
    # train mode as diffusers' scripts set it (SD 1.5 and CLIP have dropout 0); transformers
    # checkpoints only in train mode, so an eval() text encoder would ignore the setting
    unet.train()
    text_encoder.train(cfg.trains_text_encoder)
    if cfg.compute.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.trains_text_encoder:
            # non-reentrant: gradients reach the LoRA factors although the inputs need none
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            enable = enable or text_encoder.gradient_checkpointing_enable  # its older name
            enable({"use_reentrant": False})
    recording = edlora.processors(unet) if cfg.loss.attn_reg_weight > 0 else []
    return Adapters(token_ids, trainable, words, recording)


class NormStop:
    """Mix-of-Show's norm threshold: once the mean L2 norm of the words' vectors' rows reaches
    ``limit`` they stop changing (kept as they were at that step). The frozen copy is part of
    the trained state: a resumed run restores it from the vectors (``check`` after loading)."""

    def __init__(self, vectors: nn.Parameter | None, limit: float) -> None:
        self.vectors, self.limit = vectors, limit
        self.frozen: torch.Tensor | None = None

    @torch.no_grad()
    def check(self) -> bool:
        """After a step: put the vectors back when stopped, or stop them when they reached the
        limit now (True then)."""
        if self.limit <= 0 or self.vectors is None:
            return False
        if self.frozen is not None:
            self.vectors.copy_(self.frozen)
        elif self.vectors.norm(dim=-1).mean().item() >= self.limit:
            self.frozen = self.vectors.detach().clone()
            return True
        return False
