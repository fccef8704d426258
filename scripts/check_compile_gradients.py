"""Does torch.compile (inductor) give the UNet LoRA the gradients eager mode gives? One
forward and backward of the same LoRA-adapted tiny SD UNet (random non-zero LoRA factors), eager
and compiled, gradient by gradient. Exit 1 when they differ (rtol 1e-3).

    python scripts/check_compile_gradients.py

On torch 2.13.0+cpu (2026-12-01) they differ: the mid-block LoRA gets zero gradients and half of
the LoRA tensors differ, so the recipe offers no compile setting (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from sai_diffusion.miniature.tiny import build_tiny_pipeline
from sai_diffusion.models.lora import add_lora


def gradients(unet_dir: Path, compiled: bool) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder="unet")
    unet.requires_grad_(False)
    add_lora(unet, rank=4, alpha=4)
    unet.train()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # B = 0 would leave A without a gradient in both modes
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    model = torch.compile(unet) if compiled else unet
    model(x, torch.tensor([500]), context).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_pipeline(Path(tmp) / "tiny", seed=0)
        eager = gradients(Path(tmp) / "tiny", compiled=False)
        compiled = gradients(Path(tmp) / "tiny", compiled=True)
    differ = [n for n in eager if not torch.allclose(compiled[n], eager[n], rtol=1e-3, atol=1e-8)]
    zero = [n for n in differ if not compiled[n].any()]
    print(f"torch {torch.__version__}: {len(differ)} of {len(eager)} LoRA gradients differ "
          f"between eager and compiled ({len(zero)} of them all zero when compiled)")  # fmt: skip
    for name in differ[:5]:
        print(
            f"  {name}: eager norm {eager[name].norm():.3g}, compiled {compiled[name].norm():.3g}"
        )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
