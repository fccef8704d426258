"""Checks an installed sai-optim wheel in an environment that has torch and nothing else.

    bash packages/sai-optim/check.sh        # builds the wheel, makes the venv, runs this

Run from outside the repository (a checkout's sai_diffusion/ on sys.path would hide the
installed copy). Exits non-zero with the failed check's message.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import io
import sys
import warnings

import torch
from torch import nn


def check_only_torch() -> None:
    """The wheel pulled none of sai-diffusion's heavy dependencies in."""
    installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    present = sorted(installed & {"diffusers", "transformers", "peft", "gradio", "accelerate"})
    assert not present, f"installed beside the wheel, should not be: {present}"
    print(f"  installed: {', '.join(sorted(installed))}")


def check_layout() -> None:
    """sai_diffusion is a namespace package holding optim only (no file of sai-diffusion's)."""
    import sai_diffusion
    import sai_diffusion.optim as optim

    assert getattr(sai_diffusion, "__file__", None) is None, sai_diffusion.__file__
    assert "site-packages" in optim.__file__, f"not the installed copy: {optim.__file__}"
    assert importlib.util.find_spec("sai_diffusion.training") is None


def kohya_style_class():
    """``--optimizer_type sai_diffusion.optim.SGDSaI`` as kohya's get_optimizer resolves it."""
    module, _, name = "sai_diffusion.optim.SGDSaI".rpartition(".")
    return getattr(importlib.import_module(module), name)


class LoRALinear(nn.Module):
    """y = W x + B A x with W frozen, A random, B = 0 (kohya's and peft's initialisation)."""

    def __init__(self, d_in: int = 32, d_out: int = 24, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_down = nn.Linear(d_in, rank, bias=False)
        self.lora_up = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x))


def train(model, optimizer, steps: int, seed: int = 0) -> list[bool]:
    """``steps`` steps of a fixed regression; whether A moved on each."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, 24, generator=g)
    moved = []
    for _ in range(steps):
        before = model.lora_down.weight.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        moved.append(not torch.equal(before, model.lora_down.weight))
    return moved


def check_training(fused: bool | None) -> None:
    """A is untouched on step 1 (its gradient is zero) and trains from step 2; a state_dict
    round trip continues bitwise like the uninterrupted optimizer."""
    sgd_sai = kohya_style_class()
    torch.manual_seed(0)
    model = LoRALinear()
    params = [{"params": [model.lora_down.weight], "lr": 0.05}, {"params": [model.lora_up.weight]}]
    opt = sgd_sai(params, lr=0.1, momentum=0.9, fused=fused)
    assert train(model, opt, 3) == [False, True, True], "LoRA A must move from step 2 on"

    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = LoRALinear()
    resumed.load_state_dict(state["model"])
    opt2 = sgd_sai(
        [{"params": [resumed.lora_down.weight], "lr": 0.05}, {"params": [resumed.lora_up.weight]}],
        lr=0.1,
        momentum=0.9,
        fused=fused,
    )
    opt2.load_state_dict(state["opt"])
    train(model, opt, 2, seed=1)
    train(resumed, opt2, 2, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), "the resumed optimizer diverged from the uninterrupted one"
    scales = [round(row["scale"], 4) for row in opt.gsnr_table()]
    print(f"  fused={fused}: A moved on steps [2, 3]; resume bitwise equal; scales {scales}")


def main() -> int:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    check_only_torch()
    check_layout()
    check_training(fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training(fused=None)  # builds the fused CPU update where ninja and g++ are
    from sai_diffusion.optim import fused

    built = fused.cpu_kernel() is not None
    print(f"  fused CPU update: {'built' if built else fused.failure()}")
    for warning in caught:
        print(f"  warning: {warning.message}")
    print("sai-optim wheel: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
