"""One place that turns an optimizer name into a torch optimizer over named parameters.

Names: ``sgd-sai`` (ours), ``scaled-adamw`` / ``scaled-sgd`` (Riemannian-preconditioned LoRA,
Zhang & Pilanci 2024, through peft's ``create_riemannian_optimizer``), ``adamw`` and ``sgd``
(torch). Parameters may come as a model, as ``(name, param)`` pairs, or as groups
``{"name": ..., "params": [(name, param), ...], "lr": ..., "weight_decay": ...}``; every group
is split into a decayed part and a part without decay for 1-D tensors (biases, norms) and
DoRA's magnitudes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .names import OPTIMIZERS
from .sgd_sai import SGDSaI

NamedParams = Iterable[tuple[str, nn.Parameter]]


def build_optimizer(
    name: str,
    params: nn.Module | NamedParams | list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    reg: float = 1e-2,
    normalize: str = "max",
    no_decay_1d: bool = True,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over the trainable parameters in ``params``.

    ``lr`` and ``weight_decay`` are the defaults for groups that do not set their own.
    ``momentum`` is used by sgd-sai, sgd and scaled-sgd; ``betas`` by the AdamW family;
    ``reg`` is the damping of the scaled-* preconditioner; ``normalize`` is SGD-SaI's.

    Raises:
        ValueError: unknown name, no trainable parameter, or scaled-* without LoRA pairs.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    groups = _param_groups(params, weight_decay=weight_decay, no_decay_1d=no_decay_1d)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameter (requires_grad=True) was given")

    if name == "sgd-sai":
        kwargs = dict(momentum=momentum, normalize=normalize, foreach=foreach)
        if eps is not None:
            kwargs["eps"] = eps
        return SGDSaI(groups, lr=lr, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps, foreach=foreach
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=foreach)
    if name == "scaled-adamw":
        eps = 1e-8 if eps is None else eps
        return _riemannian(
            groups, torch.optim.AdamW, lr=lr, reg=reg, betas=betas, eps=eps, foreach=foreach
        )
    return _riemannian(groups, torch.optim.SGD, lr=lr, reg=reg, momentum=momentum, foreach=foreach)


def _param_groups(params, *, weight_decay: float, no_decay_1d: bool) -> list[dict[str, Any]]:
    """Normalise the accepted inputs into torch param groups carrying a ``names`` list."""
    if isinstance(params, nn.Module):
        raw = [{"name": "default", "params": list(params.named_parameters())}]
    else:
        params = list(params)
        if params and isinstance(params[0], dict):
            raw = params
        else:
            raw = [{"name": "default", "params": params}]

    groups = []
    for gi, spec in enumerate(raw):
        named = [(n, p) for n, p in spec["params"] if p.requires_grad]
        base = {k: v for k, v in spec.items() if k != "params"}
        base.setdefault("name", f"group{gi}")
        decay = base.pop("weight_decay", weight_decay)
        parts = {"decay": [], "no_decay": []}
        for n, p in named:
            # DoRA's magnitudes are weight norms, whatever their shape: decay would shrink them
            plain = no_decay_1d and (p.ndim <= 1 or "lora_magnitude_vector" in n)
            parts["no_decay" if plain else "decay"].append((n, p))
        for part, members in parts.items():
            if not members:
                continue
            groups.append(
                {
                    **base,
                    "name": base["name"] if part == "decay" else f"{base['name']}/no_decay",
                    "names": [n for n, _ in members],
                    "params": [p for _, p in members],
                    "weight_decay": decay if part == "decay" else 0.0,
                }
            )
    return groups


class _NamedParameters:
    """The two methods peft's create_riemannian_optimizer calls on a model."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self._named = named

    def named_parameters(self):
        return iter(self._named)

    def parameters(self):
        return (p for _, p in self._named)


def _riemannian(groups: list[dict[str, Any]], base_cls, *, lr: float, reg: float, **kwargs):
    """peft's scaled optimizer, re-grouped so per-group lr and weight decay survive."""
    # peft only here: the rest of the package needs torch alone
    from peft.optimizers import create_riemannian_optimizer

    named = [(n, p) for g in groups for n, p in zip(g["names"], g["params"], strict=True)]
    if not any(".lora_A." in n for n, _ in named):
        raise ValueError(
            "scaled optimizers precondition LoRA pairs (parameters named '...lora_A...' and "
            "'...lora_B...'), and none was found among the trainable parameters"
        )
    optimizer = create_riemannian_optimizer(
        _NamedParameters(named), base_cls, lr=lr, reg=reg, **kwargs
    )
    # peft puts every parameter in one group; the preconditioner holds the LoRA pairs itself,
    # so the groups can be replaced before the first step.
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(dict(group))
    optimizer.riemannian_reg = reg
    return optimizer
