"""The call contract kohya sd-scripts uses with ``--optimizer_type sai_diffusion.optim.SGDSaI``,
checked without kohya installed.

Mirrors kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (main,
2026-02-16):
- library/train_util.py ``get_optimizer``: every ``--optimizer_args`` item is split at "=" and
  its value read with ``ast.literal_eval`` (so strings must be quoted: ``normalize='none'``); a
  dotted ``--optimizer_type`` that none of its built-in names claims (it compares them
  lower-cased) is imported with ``importlib.import_module`` of all but the last part, and the
  class is called as ``cls(trainable_params, lr=args.learning_rate, **optimizer_kwargs)``.
- networks/lora.py ``LoRANetwork.prepare_optimizer_params``: one group per part, text encoder
  first, each ``{"params": <dict>.values(), "lr": text_encoder_lr or unet_lr}``; LoRAModule
  initialises lora_down Kaiming-uniform and lora_up to zero.
- train_network.py: ``accelerator.prepare(network, optimizer, ..., lr_scheduler)``;
  each step ``accelerator.backward``, ``accelerator.clip_grad_norm_(params, max_grad_norm=1.0)``,
  ``optimizer.step()``, ``lr_scheduler.step()``, ``optimizer.zero_grad(set_to_none=True)``;
  ``--save_state`` is ``accelerator.save_state(dir)`` and ``--resume dir`` is
  ``accelerator.load_state(dir)`` into freshly built objects.
The real kohya run (train_network.py on SD 1.5) is in docs/optimizer.md.
"""

from __future__ import annotations

import ast
import importlib
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from sai_diffusion.optim import SGDSaI

OPTIMIZER_TYPE = "sai_diffusion.optim.SGDSaI"
# large enough that A's first step (its gradient is of the order of B's first step) is not lost
# in float32 rounding of A, so "A moved" can be read off the parameters
TE_LR, UNET_LR = 0.05, 0.1
# the per-parameter entries docs/dev/optimizer-spec.md puts in state_dict ("State")
STATE_KEYS = ("scale", "gsnr", "gsnr_max", "initialised", "degenerate", "momentum_buffer")


# ------------------------------------------------------- kohya's side, as its code does it
def kohya_optimizer_kwargs(optimizer_args: list[str]) -> dict:
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    return kwargs


def kohya_claims_as_builtin(optimizer_type: str) -> bool:
    """Whether one of get_optimizer's built-in branches would take this name instead."""
    name = optimizer_type.lower()
    exact = {"lion", "pagedadamw", "pagedadamw32bit", "sgdnesterov", "prodigy", "adafactor",
             "adamw"}  # fmt: skip
    return (
        name in exact
        or name.endswith("8bit")
        or name.startswith("dadapt")
        or name.endswith("schedulefree")
    )


def kohya_get_optimizer(
    optimizer_type: str, optimizer_args: list[str], trainable_params, learning_rate: float
):
    kwargs = kohya_optimizer_kwargs(optimizer_args)
    if "." not in optimizer_type:
        cls = getattr(torch.optim, optimizer_type)
    else:
        *module, name = optimizer_type.split(".")
        cls = getattr(importlib.import_module(".".join(module)), name)
    return cls(trainable_params, lr=learning_rate, **kwargs)


class LoRAModule(nn.Module):
    """kohya's LoRAModule, reduced to its parameters: lora_down (A), lora_up (B)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 4) -> None:
        super().__init__()
        self.lora_down = nn.Linear(d_in, rank, bias=False)
        self.lora_up = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x))


class TinyNetwork(nn.Module):
    """Frozen "text encoder" and "U-Net" layers, each with a LoRA module beside it."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.te = nn.ModuleList(nn.Linear(width, width) for _ in range(2)).requires_grad_(False)
        self.unet = nn.ModuleList(nn.Linear(width, width) for _ in range(2)).requires_grad_(False)
        self.te_loras = nn.ModuleList(LoRAModule(width, width) for _ in range(2))
        self.unet_loras = nn.ModuleList(LoRAModule(width, width) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x
        for layer, lora in zip(self.te, self.te_loras, strict=True):
            context = torch.tanh(layer(context) + lora(context))
        h = x + context
        for layer, lora in zip(self.unet, self.unet_loras, strict=True):
            h = torch.tanh(layer(h) + lora(h))
        return h

    def prepare_optimizer_params(self, text_encoder_lr: float, unet_lr: float) -> list[dict]:
        groups = []
        for loras, lr in ((self.te_loras, text_encoder_lr), (self.unet_loras, unet_lr)):
            named = {
                f"{i}.{n}": p for i, lora in enumerate(loras) for n, p in lora.named_parameters()
            }
            groups.append({"params": named.values(), "lr": lr})
        return groups


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (input, target) for a step in every run, whatever the RNG state."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def build(optimizer_args: tuple[str, ...] = ("momentum=0.9",)):
    """accelerate, network, optimizer and kohya's constant schedule, as train_network.py
    builds them (network first: its initialisation does not depend on the optimizer)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    network = TinyNetwork()
    params = network.prepare_optimizer_params(TE_LR, UNET_LR)
    optimizer = kohya_get_optimizer(OPTIMIZER_TYPE, list(optimizer_args), params, UNET_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return accelerator, *accelerator.prepare(network, optimizer, scheduler)


def train(accelerator, network, optimizer, scheduler, steps) -> None:
    trainable = [p for p in network.parameters() if p.requires_grad]
    for step in steps:
        x, y = batch(step)
        accelerator.backward(nn.functional.mse_loss(network(x), y))
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot(optimizer: SGDSaI) -> list[dict[str, torch.Tensor]]:
    return [
        {key: optimizer.state[p][key].clone() for key in STATE_KEYS}
        for group in optimizer.param_groups
        for p in group["params"]
    ]


# ------------------------------------------------------------------------------ the tests
def test_optimizer_type_imports_our_class_and_no_builtin_claims_it():
    """``--optimizer_type sai_diffusion.optim.SGDSaI`` reaches our class through kohya's
    importlib branch, not one of its built-in names."""
    assert not kohya_claims_as_builtin(OPTIMIZER_TYPE)
    assert kohya_claims_as_builtin("AdamW8bit") and kohya_claims_as_builtin("DAdaptAdam")
    _, _, optimizer, _ = build()
    assert type(optimizer.optimizer) is SGDSaI


def test_optimizer_args_parse_into_our_keyword_arguments():
    """kohya's literal_eval gives each documented setting the type SGDSaI takes; a string must
    be quoted (``normalize=none`` is an error in kohya itself, before our class is called)."""
    args = ["momentum=0.9", "weight_decay=0.01", "eps=0", "normalize='none'", "fused=False"]
    kwargs = kohya_optimizer_kwargs(args)
    assert kwargs == dict(momentum=0.9, weight_decay=0.01, eps=0, normalize="none", fused=False)
    network = TinyNetwork()
    optimizer = kohya_get_optimizer(
        OPTIMIZER_TYPE, args, network.prepare_optimizer_params(TE_LR, UNET_LR), UNET_LR
    )
    for group in optimizer.param_groups:
        assert (group["momentum"], group["weight_decay"], group["eps"]) == (0.9, 0.01, 0)
        assert (group["normalize"], group["fused"]) == ("none", False)
    with pytest.raises(ValueError):
        kohya_optimizer_kwargs(["normalize=none"])


def test_each_group_steps_with_its_own_lr_and_lora_a_trains_from_step_2():
    """Step 1 moves every B (lora_up) from 0 to exactly -lr_group * scale * g (m = g on a
    block's first step; rtol 1e-6: a few float32 roundings) and leaves every A (lora_down),
    whose gradient is zero while B = 0, untouched; step 2 gives every A a scale in (0, 1] and
    moves it."""
    accelerator, network, optimizer, scheduler = build()
    a0 = {id(p): p.detach().clone() for n, p in network.named_parameters() if "lora_down" in n}
    # the step-1 gradient as the optimizer sees it (after clipping), read before zero_grad
    grads = {}

    def keep_gradients(opt, args, kwargs):
        grads.update({id(p): p.grad.clone() for g in opt.param_groups for p in g["params"]})

    handle = optimizer.optimizer.register_step_pre_hook(keep_gradients)
    train(accelerator, network, optimizer, scheduler, [0])
    handle.remove()
    inner = optimizer.optimizer
    for group, lr in zip(inner.param_groups, (TE_LR, UNET_LR), strict=True):
        assert group["lr"] == lr
        for p in group["params"]:
            if id(p) in a0:
                assert torch.equal(p, a0[id(p)]), "lora_down moved on step 1"
                assert not grads[id(p)].any()
            else:
                expected = -lr * inner.state[p]["scale"] * grads[id(p)]
                torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    train(accelerator, network, optimizer, scheduler, [1])
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) in a0:
                assert bool(inner.state[p]["initialised"])
                assert 0 < inner.state[p]["scale"] <= 1
                assert not torch.equal(p, a0[id(p)]), "lora_down did not move on step 2"


def test_accelerate_save_and_load_state_restore_the_scales_bitwise(tmp_path):
    """``--save_state`` after step 3, then ``--resume`` into fresh objects: every scale, g-SNR,
    the frozen max, the initialised flags and the momentum come back bitwise (A's scales,
    taken on step 2, included), and steps 4-6 give bitwise the parameters of the run that was
    never interrupted."""
    accelerator, network, optimizer, scheduler = build()
    train(accelerator, network, optimizer, scheduler, range(3))
    accelerator.save_state(str(tmp_path / "state"))
    saved = snapshot(optimizer.optimizer)
    assert all(bool(entry["initialised"]) for entry in saved)
    train(accelerator, network, optimizer, scheduler, range(3, 6))
    uninterrupted = [p.detach().clone() for p in network.parameters()]

    accelerator, network, optimizer, scheduler = build()
    accelerator.load_state(str(tmp_path / "state"))
    restored = snapshot(optimizer.optimizer)
    for before, after in zip(saved, restored, strict=True):
        for key in STATE_KEYS:
            assert before[key].dtype == after[key].dtype, key
            assert torch.equal(before[key], after[key]), key
    train(accelerator, network, optimizer, scheduler, range(3, 6))
    for a, b in zip(uninterrupted, network.parameters(), strict=True):
        assert torch.equal(a, b)
