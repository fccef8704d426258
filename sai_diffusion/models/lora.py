"""LoRA adapters injected into the base model's UNet and text encoder with peft, through
diffusers' and transformers' ``add_adapter``; ``files.lora_files`` writes what they learn."""

from __future__ import annotations

from collections.abc import Iterable

from peft import LoraConfig
from torch import nn

from ..config import DEFAULT_LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS
from ..errors import UserError
from ..files.lora_files import ADAPTER


def add_lora(
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    *,
    rank: int,
    alpha: float,
    unet_targets: Iterable[str] = DEFAULT_LORA_TARGETS,
    text_encoder_targets: Iterable[str] = TEXT_ENCODER_LORA_TARGETS,
    text_encoder_rank: int | None = None,
    text_encoder_alpha: float | None = None,
    use_dora: bool = False,
    text_encoder_2: nn.Module | None = None,
) -> None:
    """Freeze ``unet`` (and ``text_encoder``) and inject a peft LoRA adapter named ``ADAPTER``.

    Targets are module-name suffixes, matched the way peft matches them (``to_out.0`` matches
    ``...attn1.to_out.0``). B starts at zero, so the adapted model starts equal to the base one.
    Afterwards only the LoRA factors require grad. The text encoder gets LoRA only when it is
    given (SDXL's second one, ``text_encoder_2``, likewise); their rank and alpha default to
    the UNet's. A Conv2d target (``conv1``, ``conv2``,
    ``conv_shortcut`` of the ResNet blocks: LoCon) gets peft's conv LoRA, A a conv of the
    layer's kernel and B a 1x1 conv. ``use_dora`` makes every adapted layer DoRA's: peft adds
    a trained magnitude per output channel (``lora_magnitude_vector``), initialised to the
    norms of the base weight's rows, so the model still starts equal to the base one.

    Raises:
        UserError: a target matches no Linear/Conv2d module.
    """
    parts = [(unet, tuple(unet_targets), rank, alpha)]
    te_rank = rank if text_encoder_rank is None else text_encoder_rank
    te_alpha = alpha if text_encoder_alpha is None else text_encoder_alpha
    for encoder in (text_encoder, text_encoder_2):
        if encoder is not None:
            parts.append((encoder, tuple(text_encoder_targets), te_rank, te_alpha))

    # Check every target before touching any model, so a typo leaves both models unchanged.
    for model, targets, _, _ in parts:
        _check_targets(model, targets)
    for model, targets, r, a in parts:
        model.requires_grad_(False)  # before injection: the LoRA factors are created trainable
        config = LoraConfig(r=r, lora_alpha=a, target_modules=list(targets), use_dora=use_dora)
        # diffusers' ModelMixin.add_adapter and transformers' PeftAdapterMixin.add_adapter
        model.add_adapter(config, adapter_name=ADAPTER)


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in layers):
            available = ", ".join(_short_names(layers))
            raise UserError(
                f"LoRA target {target!r} matches no Linear or Conv2d module of the "
                f"{type(model).__name__}; available names include: {available}. "
                "Fix the target list (`lora_targets` in the run config)."
            )


def _short_names(names: list[str], limit: int = 12) -> list[str]:
    """Distinct module-name suffixes users can target: ``to_q``, ``to_out.0``, ``ff.net.2``."""
    short = []
    for name in names:
        parts = name.split(".")
        # Keep the parent of an indexed child (``to_out.0``), else just the last part.
        tail = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        if tail not in short:
            short.append(tail)
    return short[:limit]
