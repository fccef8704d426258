"""Float64 re-derivation of SGD-SaI (arXiv:2412.11768, Algorithm 1) as docs/dev/optimizer-spec.md defines it.

Written from the paper and the spec only, never from sai_diffusion.optim: the tests replay the
same gradient sequence through the optimizer under test and through `sgd_sai_reference`, and
compare. A pure function: the inputs are not modified.

Spec points this models (and that the tests therefore check):
- g-SNR = ||g|| / (sqrt(var) + eps), eps outside the sqrt; var is biased (1/d) for
  normalize="max" and unbiased (1/(d-1)) for normalize="none".
- normalize="sqrt-numel" (the authors' v1.1.0 branch): g-SNR = sqrt(d), defined for every block
  (a one-element block gets 1, none is degenerate), and the scale is that raw value.
- A block is initialised on its first step with a non-zero gradient; a None or all-zero gradient
  before that leaves it untouched (no decay, no momentum).
- Degenerate blocks (one element, or var == 0 exactly) get scale 1.0 and are excluded from the max.
- normalize="max": G_max is the max g-SNR over the non-degenerate blocks initialised on the first
  step that initialises any non-degenerate block; frozen afterwards. Later blocks get
  min(gsnr / G_max, 1).
- Every step for an initialised block: g <- -g if maximize; m <- g on its first step, else
  mu*m + (1-mu)*g; theta <- theta*(1 - lr*wd); theta <- theta - lr*scale*m.

The spec is silent on a None gradient for an already initialised block; this reference skips the
block on that step (the torch convention) and no test depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceResult:
    params: list[torch.Tensor]  # float64, after the last step
    momentum: list[torch.Tensor | None]  # float64 momentum m per block (None: not initialised)
    gsnr: list[float | None]  # None: not initialised or degenerate
    scale: list[float | None]  # None: not initialised
    degenerate: list[bool | None]  # None: not initialised
    initialised: list[bool]
    gsnr_max: float | None  # the frozen G_max ("max" only), None before it exists
    init_step: list[int | None] = field(default_factory=list)  # 1-based step of initialisation


def _per_block(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * n
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(value)}")
    return [float(v) for v in value]


def block_gsnr(g: torch.Tensor, eps: float, normalize: str) -> float | None:
    """g-SNR of one gradient block in float64; None for a degenerate block (one element, var == 0)."""
    g = g.detach().to(torch.float64).flatten()
    d = g.numel()
    if normalize == "sqrt-numel":
        return math.sqrt(d)
    if d == 1:
        return None
    centred = g - g.mean()
    ddof = 0 if normalize == "max" else 1
    var = (centred * centred).sum().item() / (d - ddof)
    if var == 0.0:
        return None
    return g.norm().item() / (math.sqrt(var) + eps)


def sgd_sai_reference(
    params: Sequence[torch.Tensor],
    grad_steps: Sequence[Sequence[torch.Tensor | None]],
    *,
    lr: float | Sequence[float],
    momentum: float | Sequence[float] = 0.9,
    weight_decay: float | Sequence[float] = 0.0,
    eps: float | Sequence[float] = 1e-8,
    normalize: str = "max",
    maximize: bool = False,
    round_to: torch.dtype | None = None,
) -> ReferenceResult:
    """Run SGD-SaI in float64 over `grad_steps` (one list of per-block gradients per step).

    `lr`, `momentum`, `weight_decay` and `eps` are one value for all blocks or one per block (that
    is how param groups are modelled). `round_to` rounds the parameters to that dtype after every
    step, the spec's "math in fp32, written back rounded" for low-precision params; the momentum
    stays in float64 (the spec keeps it in fp32 for low-precision params).
    """
    if normalize not in ("max", "none", "sqrt-numel"):
        raise ValueError(f"normalize must be 'max', 'none' or 'sqrt-numel', got {normalize!r}")
    n = len(params)
    lrs = _per_block(lr, n, "lr")
    mus = _per_block(momentum, n, "momentum")
    wds = _per_block(weight_decay, n, "weight_decay")
    epss = _per_block(eps, n, "eps")

    theta = [p.detach().to(torch.float64).clone() for p in params]
    if round_to is not None:
        theta = [t.to(round_to).to(torch.float64) for t in theta]
    m: list[torch.Tensor | None] = [None] * n
    gsnr: list[float | None] = [None] * n
    scale: list[float | None] = [None] * n
    degenerate: list[bool | None] = [None] * n
    initialised = [False] * n
    init_step: list[int | None] = [None] * n
    g_max: float | None = None

    for step, grads in enumerate(grad_steps, start=1):
        if len(grads) != n:
            raise ValueError(f"step {step}: expected {n} gradients, got {len(grads)}")
        grads64 = [None if g is None else g.detach().to(torch.float64) for g in grads]

        # 1) initialise the blocks that see their first non-zero gradient now
        new = []
        for i, g in enumerate(grads64):
            if initialised[i] or g is None or not bool((g != 0).any()):
                continue
            initialised[i] = True
            init_step[i] = step
            gsnr[i] = block_gsnr(g, epss[i], normalize)
            degenerate[i] = gsnr[i] is None
            new.append(i)

        # 2) their scales
        if normalize in ("none", "sqrt-numel"):
            for i in new:
                scale[i] = 1.0 if degenerate[i] else gsnr[i]
        else:
            fresh = [gsnr[i] for i in new if not degenerate[i]]
            first_max_step = g_max is None and len(fresh) > 0
            if first_max_step:
                g_max = max(fresh)
            for i in new:
                if degenerate[i]:
                    scale[i] = 1.0
                elif first_max_step:
                    scale[i] = gsnr[i] / g_max
                else:
                    scale[i] = min(gsnr[i] / g_max, 1.0)

        # 3) the update of every initialised block
        for i, g in enumerate(grads64):
            if not initialised[i] or g is None:
                continue
            if maximize:
                g = -g
            if i in new or mus[i] == 0.0:
                m[i] = g.clone()
            else:
                m[i] = mus[i] * m[i] + (1.0 - mus[i]) * g
            theta[i] = theta[i] * (1.0 - lrs[i] * wds[i]) - lrs[i] * scale[i] * m[i]
            if round_to is not None:
                theta[i] = theta[i].to(round_to).to(torch.float64)

    return ReferenceResult(
        params=theta,
        momentum=m,
        gsnr=gsnr,
        scale=scale,
        degenerate=degenerate,
        initialised=initialised,
        gsnr_max=g_max,
        init_step=init_step,
    )
