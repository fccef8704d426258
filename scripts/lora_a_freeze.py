"""The released SGD-SaI implementations never train LoRA's A matrix; a reproduction.

    python scripts/lora_a_freeze.py          # needs torch, sgd-sai, pytorch-optimizer

LoRA starts with B = 0 and A random, so the first gradient of A, B^T dL/dy x^T, is exactly
zero. SGD-SaI (arXiv:2412.11768) fixes each tensor's learning-rate scale from its first
gradient's g-SNR = ||g|| / std(g), and the released code takes that first gradient as it
comes: A's g-SNR is 0 (or 0/0 turned into 0), so A's step is lr * 0 * momentum forever and A
only decays, A_k = A_0 (1 - lr wd)^k. The adapter then trains only B: a rank-r update B A_0
with A_0 random, which is not LoRA.

One LoRA layer (kohya's and peft's initialisation: A Kaiming-uniform, B zero), a fixed
regression, five steps, each optimizer with its defaults but lr=1e-2 and momentum=0.9. For
every optimizer installed (sgd-sai is one module name, so run the script once per version),
it prints A's and B's lr factor (the stored g-SNR or scale), A's gradient and how far each
step moved A beyond the weight decay, and whether A is exactly its own decay. sai-optim (sai_diffusion.optim.SGDSaI) defers a
tensor's g-SNR to its first non-zero gradient: A is untouched on step 1 and trains from step 2.
The output of this script is in docs/optimizer.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import math

import torch
from torch import nn

STEPS, LR, MOMENTUM = 5, 1e-2, 0.9


class LoRALinear(nn.Module):
    """y = W x + B A x: W frozen, A (rank, d_in) Kaiming-uniform, B (d_out, rank) zero."""

    def __init__(self, d_in: int = 64, d_out: int = 48, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def released_sgd_sai():
    """sgd-sai's SGD_sai (the PyPI release is 1.0.3; 1.0.4 is on the authors' GitHub only)."""
    module = importlib.import_module("sgd_sai")
    found = getattr(importlib.import_module("sgd_sai.__version__"), "__version__", None)
    return f"sgd-sai {found or version('sgd-sai')} SGD_sai", module.SGD_sai


def pytorch_optimizer_sgd_sai():
    module = importlib.import_module("pytorch_optimizer")
    return f"pytorch_optimizer {version('pytorch_optimizer')} SGDSaI", module.SGDSaI


def sai_optim_sgd_sai():
    module = importlib.import_module("sai_diffusion.optim")
    dist = "sai-optim" if version("sai-optim") != "?" else "sai-diffusion"
    return f"{dist} {version(dist)} sai_diffusion.optim.SGDSaI", module.SGDSaI


def stored_scale(optimizer, p: torch.Tensor) -> float:
    """The per-tensor factor the optimizer multiplies lr by: the released code's raw g-SNR
    ("gsnr", divided by the global max in 1.0.4), sai-optim's normalised "scale"."""
    state = optimizer.state[p]
    value = state.get("scale", state.get("gsnr"))
    if value is None:
        return math.nan
    max_gsnr = getattr(optimizer, "max_gsnr", None)  # sgd-sai 1.0.4 divides by it
    if "scale" not in state and isinstance(max_gsnr, torch.Tensor | float) and max_gsnr > 0:
        value = value / max_gsnr
    return float(value)


def run(label: str, optimizer_class) -> None:
    torch.manual_seed(0)
    model = LoRALinear()
    x, y = torch.randn(256, 64), torch.randn(256, 48)
    a0 = model.lora_A.detach().clone()
    optimizer = optimizer_class([model.lora_A, model.lora_B], lr=LR, momentum=MOMENTUM)
    wd = optimizer.param_groups[0].get("weight_decay", 0.0)
    grads, trained = [], []
    with contextlib.redirect_stdout(io.StringIO()):  # sgd-sai prints a banner on step 1
        for _ in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            grads.append(model.lora_A.grad.abs().max().item())
            before = model.lora_A.detach().clone()
            optimizer.step()
            # the step minus the decoupled decay (the same multiply the optimizers do)
            trained.append((model.lora_A - before * (1 - LR * wd)).abs().max().item())
    only_decay = torch.allclose(model.lora_A, a0 * (1 - LR * wd) ** STEPS, rtol=1e-6, atol=0)
    print(f"{label}  (weight_decay={wd})")
    print(
        f"  lr factor: A {stored_scale(optimizer, model.lora_A):.4g}, "
        f"B {stored_scale(optimizer, model.lora_B):.4g}"
    )
    print("  step k                        " + " ".join(f"{k:>8}" for k in range(1, STEPS + 1)))
    print("  max |grad A|                  " + " ".join(f"{g:8.1e}" for g in grads))
    print("  max |A step| beyond decay     " + " ".join(f"{t:8.1e}" for t in trained))
    print(f"  A_{STEPS} == A_0 (1 - lr wd)^{STEPS}, A only decayed: {only_decay}")


def main() -> None:
    print(f"torch {torch.__version__}; one LoRA layer 64 -> 48, rank 4; lr {LR}, momentum "
          f"{MOMENTUM}, {STEPS} steps, each optimizer's default weight decay\n")  # fmt: skip
    for candidate in (released_sgd_sai, pytorch_optimizer_sgd_sai, sai_optim_sgd_sai):
        try:
            label, optimizer_class = candidate()
        except ImportError as exc:
            print(f"({candidate.__name__}: not installed, {exc})\n")
            continue
        run(label, optimizer_class)
        print()


if __name__ == "__main__":
    main()
