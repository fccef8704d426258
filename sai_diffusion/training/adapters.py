"""What a run adds to the base model and trains: the concept words (plain or layer-wise), the
LoRA adapters of the UNet and the text encoder, and the rule that stops the words' vectors.
"""

from __future__ import annotations

import functools
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
    # by name: "unet.<peft name>", "text_encoder.<...>" (SDXL also "text_encoder_2.<...>")
    trainable: dict[str, nn.Parameter]
    words: edlora.LayerWords | None = None  # an ED-LoRA run's layer-wise words
    # the cross-attention processors that record attention maps (attn_reg_weight > 0)
    attention: list[edlora.LayerwiseAttnProcessor] = field(default_factory=list)

    def param_groups(self, lrs: dict[str, float]) -> list[dict]:
        """Optimizer groups by name (``unet``, ``text_encoder``: every text encoder's LoRA,
        ``embeddings``: the words' vectors), each with its lr of ``lrs``
        (``TrainConfig.group_lrs``); empty ones left out."""
        groups: dict[str, list] = {"unet": [], "text_encoder": [], "embeddings": []}
        for name, p in self.trainable.items():
            part = name.split(".")[0]
            group = "embeddings" if name.endswith(".vectors") else part.removesuffix("_2")
            groups[group].append((name, p))
        return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]

    @property
    def conv_pairs(self) -> bool:
        """LoRA on conv layers (LoCon): 4-D factors."""
        return any(".lora_A." in n and p.dim() > 2 for n, p in self.trainable.items())

    @functools.cached_property
    def trained_parts(self) -> frozenset[str]:
        """The parts with a trained tensor: "unet" and the text encoders that train (their
        LoRA or the words' vectors), by part name."""
        return frozenset(name.split(".")[0] for name in self.trainable)

    @property
    def vectors(self) -> list[nn.Parameter]:
        """The concept words' trained vectors, one parameter per text encoder (embeddings.train),
        else empty."""
        return [p for n, p in self.trainable.items() if n.endswith(".vectors")]


def add_adapters(cfg: TrainConfig, concept: Concept, pipe, family: StableDiffusion) -> Adapters:
    """Add the concept's words and the LoRA adapters to ``pipe``'s modules; the trained tensors
    are fp32, the trained modules in train mode.

    Raises:
        UserError: a concept word already in the vocabulary, a LoRA target that matches nothing,
            a UNet without cross-attention for ED-LoRA.
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    encoders = family.text_encoders(pipe)
    emb, lora = cfg.embeddings, cfg.lora
    # The concept's words, initialised from the class word(s), before LoRA wraps the encoders;
    # every encoder has its own rows, the same ids (SDXL's tokenizers share the vocabulary).
    generator = torch.Generator().manual_seed(cfg.seed)
    for encoder in encoders:
        ids = add_concept_tokens(encoder.tokenizer, encoder.module, concept.words,
                                 init_word=concept.initialisers,
                                 init_noise_std=emb.init_noise_std, generator=generator)  # fmt: skip
        if encoder is encoders[0]:
            token_ids = ids
        elif ids != token_ids:
            raise ValueError(f"{encoder.name} gave the words ids {ids}, not {token_ids}")
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
    second = len(encoders) > 1 and (
        lora.text_encoder if lora.text_encoder_2 is None else lora.text_encoder_2
    )
    add_lora(
        unet,
        text_encoder if lora.text_encoder else None,
        text_encoder_2=encoders[1].module if second else None,
        rank=lora.rank,
        alpha=lora.alpha,
        unet_targets=tuple(lora.targets),
        text_encoder_targets=family.text_encoder_lora_targets,
        text_encoder_rank=lora.text_encoder_rank,
        text_encoder_alpha=lora.text_encoder_alpha,
        use_dora=lora.dora,
    )
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    for encoder in encoders:
        if emb.train:
            make_token_embeddings_trainable(encoder.module, token_ids)
        trainable |= {f"{encoder.name}.{n}": p
                      for n, p in encoder.module.named_parameters() if p.requires_grad}  # fmt: skip
    for p in trainable.values():  # only the adapters (and token vectors) train, in fp32
        p.data = p.data.float()
    # train mode as diffusers' scripts set it (SD 1.5 and CLIP have dropout 0); transformers
    # checkpoints only in train mode, so an eval() text encoder would ignore the setting
    unet.train()
    adapters = Adapters(token_ids, trainable, words)
    for encoder in encoders:
        encoder.module.train(encoder.name in adapters.trained_parts)
    if cfg.compute.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for module in (e.module for e in encoders if e.name in adapters.trained_parts):
            # non-reentrant: gradients reach the LoRA factors although the inputs need none
            enable = getattr(module, "activation_checkpointing_enable", None)
            enable = enable or module.gradient_checkpointing_enable  # its older name
            enable({"use_reentrant": False})
    if cfg.loss.attn_reg_weight > 0:
        adapters.attention = edlora.processors(unet)
    return adapters


class NormStop:
    """Mix-of-Show's norm threshold: once the mean L2 norm of the words' vectors' rows reaches
    ``limit`` they stop changing (kept as they were at that step). With two text encoders
    (SDXL) each encoder's vectors stop on their own. Checked on the device, without waiting
    for it: ``frozen`` follows the vectors until they stop, then holds them. A resumed run
    stops them again from the restored vectors (``check`` after loading)."""

    def __init__(self, vectors: list[nn.Parameter], limit: float) -> None:
        self.vectors, self.limit = list(vectors), limit
        on = limit > 0
        self.frozen = [v.detach().clone() for v in self.vectors] if on else []
        self.stopped = [torch.zeros((), dtype=torch.bool, device=v.device)
                        for v in self.vectors] if on else []  # fmt: skip
        self.stopped_at = [torch.zeros((), dtype=torch.long, device=v.device)
                           for v in self.vectors] if on else []  # fmt: skip
        self._said: set[int] = set()

    @torch.no_grad()
    def check(self, step: int = 0) -> None:
        """After step ``step``: put stopped vectors back; stop those that reach the limit now."""
        for i, vectors in enumerate(self.vectors if self.limit > 0 else []):
            stopped = self.stopped[i]
            kept = torch.where(stopped, self.frozen[i], vectors)
            vectors.copy_(kept)
            self.frozen[i].copy_(kept)
            now = ~stopped & (kept.norm(dim=-1).mean() >= self.limit)
            self.stopped_at[i] = torch.where(now, step, self.stopped_at[i])
            self.stopped[i] = stopped | now

    def newly_stopped(self) -> list[int]:
        """The steps at which vectors stopped since the last call (reads the device)."""
        steps = []
        for i, stopped in enumerate(self.stopped):
            if i not in self._said and bool(stopped):
                self._said.add(i)
                steps.append(int(self.stopped_at[i]))
        return steps
