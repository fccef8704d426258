"""SGD-SaI: SGD with momentum and learning-rate Scaling at Initialization.

Paper: Xu, Xiang, Cai, Wen, "No More Adam: Learning Rate Scaling at Initialization is All You
Need", arXiv:2412.11768, Algorithm 1. Each parameter tensor ("block") i gets a constant learning
rate scale from the gradient signal-to-noise ratio of its first gradient,

    gsnr_i  = ||g_i||_2 / (sqrt(var(g_i)) + eps)      scale_i = gsnr_i / max_k gsnr_k,

and then trains as SGD with momentum and decoupled weight decay:

    m <- mu * m + (1 - mu) * g      (m = g on a block's first step)
    theta <- theta * (1 - lr * wd) - lr * scale_i * m.

What this implementation adds to the released ones (docs/dev/optimizer-spec.md states the exact
rules; tests/optim checks them against a float64 re-derivation and the released sgd-sai 1.0.3):

* LoRA-safe: a block whose gradient is None or all zero is not initialised and not touched. Its
  g-SNR is taken on its first step with a non-zero gradient (LoRA's A factor has a zero gradient
  on step 1 because B starts at zero; the released code freezes it forever). Under
  ``normalize="max"`` the max is frozen when first set, so later blocks never rescale the
  others, and their scale is clamped to 1: the global lr stays the largest per-block step.
* Degenerate blocks (one element, or a gradient with zero variance) have no defined g-SNR
  (sqrt(var) = 0 gives |g| / eps ~ 1e8 in the released code, which swamps every other scale).
  Rule: they take scale 1, i.e. the plain global lr as SGD-momentum would, and are left out of
  the max, so they never change another block's scale.
* Everything is in ``state_dict()``: a resumed run keeps its scales, its max and which blocks are
  initialised, and continues bitwise identical to an uninterrupted run.
* ``step()`` never waits for the device. Which blocks got initialised on step t is copied to the
  host asynchronously and read at the start of step t + 1; from then on a block's scale is a
  host float and the update is one pass over p, g, m per (param group, dtype): one Triton
  kernel launch on CUDA (``optim/fused_cuda.py``), one C++ call on the CPU (``optim/fused.py``),
  or, where those do not apply, three multi-tensor kernels per (device, dtype) group.
* bf16/fp16 parameters: momentum is kept in fp32 and all math is fp32, rounded once on write.
* ``normalize="none"`` reproduces the released ``sgd-sai`` 1.0.3 (raw g-SNR as the scale, the
  unbiased variance of ``Tensor.std()``), for comparison with published numbers.
* ``normalize="sqrt-numel"`` is the authors' later rule (github.com/AnonymousAlethiometer/SGD_SaI,
  branch v1.1.0-nightly, commit 6c13d90, ``sgd_sai/sgd_sai.py``, "sqrt(numel) as an
  approximation of g-SNR"): scale_i = sqrt(numel_i), raw, no max, no eps (a zero-mean gradient
  has g-SNR ~ sqrt(numel)). A one-element block gets sqrt(1) = 1 and no block is degenerate.
  The scale does not depend on the gradient's values, but a block still takes it on its first
  non-zero finite gradient (the rule above, so LoRA's A starts as in the other modes; the
  branch sets it on the first step for every block with a gradient, zero or not).

Distributed training: g-SNR is computed from the gradients ``step()`` sees. Under DDP (and
accelerate) these are all-reduced, unscaled by the GradScaler and fully accumulated, so every
rank computes the same scales. Sharded parameters (FSDP/ZeRO-3) would need global reductions of
the norm, variance and max and are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import fused, fused_cuda

NORMALIZE_MODES = ("max", "none", "sqrt-numel")
# The update of a chunk needs one temporary the size of the chunk; bound it to 256 MB of fp32.
_CHUNK_NUMEL = 1 << 26
# Devices whose steady step may take the Triton kernel (the interpreter tests add "cpu").
_TRITON_DEVICES = ("cuda",)

# Per-parameter state keys holding scalars or buffers whose dtype must survive load_state_dict
# (torch casts floating state to the parameter's dtype, which would turn fp32 momentum of a
# bf16 parameter into bf16).
_STATE_KEYS = ("momentum_buffer", "gsnr", "scale", "gsnr_max", "initialised", "degenerate")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class SGDSaI(Optimizer):
    """SGD-SaI (arXiv:2412.11768, Algorithm 1), LoRA-safe and resumable.

    On CUDA the steady step of float32 / bfloat16 / float16 blocks is one Triton kernel launch
    per param group and dtype (20 bytes moved per fp32 parameter instead of about 40) when
    triton is installed and works; otherwise, and with ``fused=False``, the foreach kernels.

    Args:
        params: parameters or param groups (groups may set lr, momentum, weight_decay, eps,
            maximize).
        lr: global learning rate; the largest per-block step under ``normalize="max"``.
        momentum: mu in m <- mu m + (1 - mu) g; 0 disables the buffer.
        weight_decay: decoupled decay, theta <- theta (1 - lr wd), not multiplied by the scale.
        eps: added to sqrt(variance) in the g-SNR denominator (unused by ``"sqrt-numel"``).
        normalize: ``"max"`` (paper: scales in (0, 1]), ``"none"`` (released sgd-sai 1.0.3:
            the raw g-SNR) or ``"sqrt-numel"`` (the authors' v1.1.0 branch: sqrt(numel)).
        maximize: ascend instead of descend.
        foreach: multi-tensor kernels (default) or a per-tensor loop; both give identical results.
        fused: the one-pass update of the steady steps, equal to the foreach path up to
            rounding. CPU float32 / float64 blocks: the C++ kernel (``optim/fused.py``). CUDA
            float32 / bfloat16 / float16 blocks (contiguous, the gradient in the parameter's
            dtype): a Triton kernel, one launch per param group and dtype
            (``optim/fused_cuda.py``); the first (g-SNR) step stays on the foreach kernels.
            None (default): where it applies and the kernel builds; on CUDA without a working
            triton, the foreach kernels (warned once). True: the same, but a kernel that cannot
            be built or launched is an error. False: never.

    Raises:
        ValueError: for an invalid hyperparameter, naming it and its valid range.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        normalize: str = "max",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(
                f"SGDSaI: normalize must be one of {NORMALIZE_MODES}, got {normalize!r}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            normalize=normalize,  # saved with the groups, checked on load
        )
        self.normalize = normalize
        super().__init__(params, defaults)  # each group passes add_param_group's checks
        self._reset_host_view()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # scales are relative to one max over every group: a per-group mode would mix meanings
        if param_group.get("normalize", self.normalize) != self.normalize:
            raise ValueError(
                f"SGDSaI: normalize is optimizer-wide (got normalize={param_group['normalize']!r} "
                f"in a param group of an optimizer built with normalize={self.normalize!r})"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(**{k: group[k] for k in ("lr", "momentum", "weight_decay", "eps")})

    # ------------------------------------------------------------------ host-side view of state
    def _reset_host_view(self) -> None:
        # scale of every initialised block, as a host float (read once, never per step)
        self._scales: dict[Tensor, float] = {}
        # the frozen max g-SNR, a 0-dim fp32 device tensor (NaN until set)
        self._gsnr_max: Tensor | None = None
        # blocks initialised on the last step, with their (flag, scale) pairs in flight to the host
        self._in_flight: list[tuple[list[Tensor], Tensor, Any]] = []
        # the Triton kernel's device tables, per (param group, device, dtype)
        self._tables: dict[tuple[int, torch.device, torch.dtype], fused_cuda.Table] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's __getstate__ keeps only defaults, state and param_groups (copy.deepcopy and
        # pickle go through it): the mode is read back from the defaults
        super().__setstate__(state)
        self.normalize = self.defaults["normalize"]
        self._reset_host_view()
        self._read_host_view_from_state()

    def _read_host_view_from_state(self) -> None:
        """Rebuild the host view from the state dicts (reads device values: load time only)."""
        maxima = []
        for p, st in self.state.items():
            if "initialised" not in st:
                continue
            if bool(st["initialised"]):
                self._scales[p] = float(st["scale"])
            if "gsnr_max" in st and not torch.isnan(st["gsnr_max"]):
                maxima.append(st["gsnr_max"])
        if maxima:
            self._gsnr_max = maxima[0].detach().clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group in state_dict["param_groups"]:
            if group.get("normalize", self.normalize) != self.normalize:
                raise ValueError(
                    f"SGDSaI: this state was saved with normalize={group['normalize']!r}, but "
                    f"the optimizer was built with normalize={self.normalize!r}; its scales "
                    "would mean something else"
                )
        saved = state_dict["state"]
        # keep our tensors' dtypes: torch would cast them to each parameter's dtype
        keep = {
            pid: {k: v for k, v in st.items() if k in _STATE_KEYS and torch.is_tensor(v)}
            for pid, st in saved.items()
        }
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params, strict=False):
            for key, value in keep.get(pid, {}).items():
                self.state[p][key] = value.detach().clone().to(device=p.device)
        self._reset_host_view()
        self._read_host_view_from_state()

    @property
    def gsnr_max(self) -> float | None:
        """The frozen max g-SNR of ``normalize="max"`` (None until set). Reads the device."""
        self._drain_in_flight()
        if self._gsnr_max is None or torch.isnan(self._gsnr_max):
            return None
        return float(self._gsnr_max)

    # ------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._drain_in_flight()
        fresh: list[tuple[dict[str, Any], Tensor]] = []
        for group in self.param_groups:
            settled = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGDSaI does not support sparse gradients")
                if p in self._scales:
                    settled.append(p)
                else:
                    fresh.append((group, p))
            if settled:
                self._update_settled(group, settled)
        if fresh:
            kernel = self._fused_kernel(fresh)
            if kernel is not None:
                self._initialise_fused(fresh, kernel)
            else:
                self._initialise(fresh)
        return loss

    def _drain_in_flight(self) -> None:
        """Learn which blocks the previous step initialised (already on the host by now)."""
        for params, host, event in self._in_flight:
            if event is not None:
                event.synchronize()
            for p, (flag, scale) in zip(params, host.tolist(), strict=True):
                if flag:
                    self._scales[p] = scale
        self._in_flight = []

    def _initialise(self, fresh: list[tuple[dict[str, Any], Tensor]]) -> None:
        """First step of blocks without a scale yet: g-SNR, scale, m = g, masked update.

        Everything stays on the device: a block whose gradient turns out to be all zero (or not
        finite) gets scale 0 and decay factor 1, so the update leaves it untouched and it is
        fresh again on the next step.
        """
        stats = []
        for group, p in fresh:
            g = p.grad.to(_compute_dtype(p.dtype))
            if group["maximize"]:
                g = -g
            flat = g.reshape(-1)
            norm = torch.linalg.vector_norm(flat)
            if self.normalize == "sqrt-numel":  # defined for every block, one element included
                degenerate = torch.zeros((), dtype=torch.bool, device=g.device)
                gsnr = torch.full_like(norm, math.sqrt(flat.numel()))
            elif flat.numel() > 1:
                var = flat.var(correction=0 if self.normalize == "max" else 1)
                degenerate = var == 0
                gsnr = norm / (var.sqrt() + group["eps"])
                gsnr = torch.where(degenerate, torch.zeros_like(gsnr), gsnr)
            else:
                degenerate = torch.ones((), dtype=torch.bool, device=g.device)
                gsnr = torch.zeros_like(norm)
            # zero and non-finite gradients (NaN, inf) leave the block fresh: its g-SNR waits
            usable = torch.isfinite(norm) & (norm > 0)
            stats.append((g, usable, degenerate, gsnr.float()))

        device = fresh[0][1].device
        candidates = torch.stack(
            [
                torch.where(usable & ~degenerate, gsnr, torch.zeros_like(gsnr)).to(device)
                for _, usable, degenerate, gsnr in stats
            ]
        )
        gsnr_max = self._freeze_gsnr_max(candidates)

        by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        for (group, p), (g, nonzero, degenerate, gsnr) in zip(fresh, stats, strict=True):
            if self.normalize == "max":
                ratio = torch.clamp(gsnr / gsnr_max.to(gsnr.device), max=1.0)
            else:
                ratio = gsnr
            scale = torch.where(degenerate, torch.ones_like(gsnr), ratio)
            scale = torch.where(nonzero, scale, torch.zeros_like(scale))

            state = self.state[p]
            state.update(
                gsnr=gsnr,
                scale=scale,
                gsnr_max=gsnr_max.clone().to(gsnr.device),
                initialised=nonzero,
                degenerate=degenerate,
            )
            m = g
            if group["momentum"] != 0:
                m = state["momentum_buffer"] = g.clone(memory_format=torch.preserve_format)

            lr, wd = group["lr"], group["weight_decay"]
            theta = p if p.dtype == m.dtype else p.to(m.dtype)  # fp32 math for bf16/fp16
            if wd != 0:
                decay = torch.full((), 1.0 - lr * wd, dtype=m.dtype, device=m.device)
                theta.mul_(torch.where(nonzero, decay, torch.ones_like(decay)))
            # a block left fresh (zero or non-finite gradient: norm > 0 is False for NaN) is
            # not touched; scale 0 alone would still let NaN * 0 = NaN through
            step_dir = torch.where(nonzero, m, torch.zeros((), dtype=m.dtype, device=m.device))
            theta.addcmul_(step_dir, scale.to(m.dtype), value=-lr)
            if theta is not p:
                p.copy_(theta)

            params, flags = by_device.setdefault(p.device, ([], []))
            params.append(p)
            flags.append(torch.stack([nonzero.float(), scale]))

        for dev, (params, flags) in by_device.items():
            packed = torch.stack(flags)
            if dev.type == "cuda":
                # the copy and its event on the parameters' device: recorded on another device's
                # stream, the event could fire before the copy lands and the host would read
                # stale flags (and initialise a block twice)
                with torch.cuda.device(dev):
                    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                    host.copy_(packed, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(dev))
            else:
                host, event = packed.to("cpu"), None
            self._in_flight.append((params, host, event))

    def _freeze_gsnr_max(self, candidates: Tensor) -> Tensor:
        """The max g-SNR over this step's usable non-degenerate blocks (``candidates``, 0 for the
        others), frozen once it exists; every block's ``gsnr_max`` state learns it."""
        step_max = candidates.max()
        step_max = torch.where(step_max > 0, step_max, torch.full_like(step_max, math.nan))
        if self._gsnr_max is None:
            self._gsnr_max = step_max
        else:
            old = self._gsnr_max.to(step_max.device)
            self._gsnr_max = torch.where(torch.isnan(old), step_max, old)
        for st in self.state.values():  # blocks initialised before G_max existed learn it now
            if "gsnr_max" in st:
                st["gsnr_max"].copy_(self._gsnr_max)
        return self._gsnr_max

    def _fused_kernel(self, fresh: list[tuple[dict[str, Any], Tensor]]):
        """The fused CPU kernel when every fresh block can take it (one max over all of them
        is computed in one place), else None."""
        if not all(
            _fusable(group, p) and p.is_contiguous() and p.grad.is_contiguous()
            for group, p in fresh
        ):
            return None
        return _kernel_for(group for group, _ in fresh)

    def _initialise_fused(self, fresh: list[tuple[dict[str, Any], Tensor]], kernel) -> None:
        """``_initialise`` on the CPU with the fused kernel: the statistics of every fresh
        gradient in one call (two passes each, float64 sums), the scales as tensor ops over all
        blocks at once, and the first update writing m = g and p in one pass per block.
        Same rules; results equal ``_initialise``'s to rounding."""
        params = [p for _, p in fresh]
        grads = [p.grad for p in params]
        stats = kernel.gsnr_stats(grads)  # (n, 3): sum g^2, sum (g - mean)^2, all equal
        numel = torch.tensor([p.numel() for p in params], dtype=torch.float64)
        norm = stats[:, 0].sqrt()
        if self.normalize == "sqrt-numel":  # the statistics only say which blocks are usable
            degenerate = torch.zeros(len(params), dtype=torch.bool)
            gsnr = numel.sqrt().float()
        else:
            eps = torch.tensor([group["eps"] for group, _ in fresh], dtype=torch.float64)
            correction = 0 if self.normalize == "max" else 1
            std = (stats[:, 1] / (numel - correction).clamp_min(1)).sqrt()
            # all elements equal, or a variance too small to represent (var == 0 in _initialise)
            degenerate = (numel <= 1) | (stats[:, 2] > 0) | (std == 0)
            gsnr = torch.where(degenerate, 0.0, norm / (std + eps)).float()
        usable = torch.isfinite(norm) & (norm > 0)
        gsnr_max = self._freeze_gsnr_max(torch.where(usable & ~degenerate, gsnr, 0.0))
        ratio = torch.clamp(gsnr / gsnr_max, max=1.0) if self.normalize == "max" else gsnr
        scale = torch.where(usable, torch.where(degenerate, 1.0, ratio), 0.0)

        scales, flags = scale.tolist(), usable.tolist()
        # each block's 0-dim state entries are views of these (n,) tensors: one allocation per
        # entry kind instead of one per block (torch.save stores a shared storage once, and
        # load_state_dict gives every block its own copy); the blocks' G_max views share one
        # element, which _freeze_gsnr_max only ever sets to the common value
        per_block = zip(
            fresh, gsnr.unbind(), scale.unbind(), usable.unbind(), degenerate.unbind(),
            gsnr_max.clone().expand(len(fresh)).unbind(), strict=True,
        )  # fmt: skip
        batches: dict[tuple[int, torch.dtype], list[int]] = {}  # one kernel call: one dtype
        for i, ((group, p), gsnr_i, scale_i, usable_i, degenerate_i, max_i) in enumerate(per_block):
            state = self.state[p]
            state.update(
                gsnr=gsnr_i, scale=scale_i, gsnr_max=max_i, initialised=usable_i,
                degenerate=degenerate_i,
            )  # fmt: skip
            if flags[i]:
                batches.setdefault((id(group), p.dtype), []).append(i)
            if group["momentum"] != 0:  # the fused update below writes it (m = g)
                state["momentum_buffer"] = torch.empty_like(p.grad)
                if not flags[i]:  # left fresh: m = g, as _initialise keeps it
                    state["momentum_buffer"].copy_(-p.grad if group["maximize"] else p.grad)
        for members in batches.values():
            group = fresh[members[0]][0]
            chosen = [params[i] for i in members]
            moms = [self.state[p]["momentum_buffer"] for p in chosen] if group["momentum"] else []
            lr = group["lr"]
            kernel.sgd_sai_step_(
                chosen, [p.grad for p in chosen], moms, [scales[i] for i in members],
                lr, 0.0, 1.0 - lr * group["weight_decay"], group["maximize"], True,
            )  # fmt: skip
            for i, p in zip(members, chosen, strict=True):  # settled once the update is done
                self._scales[p] = scales[i]

    def _update_settled(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """theta <- theta (1 - lr wd) - lr scale m, for blocks whose scale is known."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        foreach = group["foreach"] is not False
        for batch in _group_by_device_and_dtype(params):
            if batch[0].device.type in _TRITON_DEVICES:
                batch = self._triton_update(group, batch)  # the blocks it leaves to foreach
            elif self._fused_update(group, batch):
                batch = []
            if not batch:
                continue
            # CPU: one in-place addcmul with the 0-dim scale tensors of the state, no temporary.
            # CUDA: a 0-dim tensor list would leave foreach's fast path, so the scales are host
            # floats and the scaled direction is a temporary, bounded by chunking.
            on_cpu = batch[0].device.type == "cpu"
            for chunk in [batch] if on_cpu else _chunks(batch, _CHUNK_NUMEL):
                if on_cpu:
                    scales = [self.state[p]["scale"] for p in chunk]
                else:
                    scales = [self._scales[p] for p in chunk]
                grads = [p.grad for p in chunk]
                moms = [self.state[p]["momentum_buffer"] for p in chunk] if mu != 0 else None
                low_precision = chunk[0].dtype != _compute_dtype(chunk[0].dtype)
                if low_precision:
                    grads = [g.float() for g in grads]
                    thetas = [p.float() for p in chunk]
                else:
                    thetas = chunk
                _sgd_sai_update(
                    thetas, grads, moms, scales,
                    lr=lr, momentum=mu, decay=1.0 - lr * wd, maximize=group["maximize"],
                    foreach=foreach,
                )  # fmt: skip
                if low_precision:
                    for p, theta in zip(chunk, thetas, strict=True):
                        p.copy_(theta)

    def _triton_update(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The Triton kernel, in one launch, over the blocks of ``params`` (one device and
        dtype) that it can stream; returns the others, left to the foreach path.

        Raises:
            RuntimeError: ``fused=True`` and the kernel cannot be built or launched.
        """
        if group["fused"] is False or params[0].dtype not in fused_cuda.DTYPES:
            return params
        mu = group["momentum"]
        moms = {p: self.state[p]["momentum_buffer"] for p in params} if mu != 0 else {}
        taken, left = [], []
        for p in params:
            (taken if fused_cuda.fits(p, p.grad, moms.get(p)) else left).append(p)
        if not taken:
            return params
        table = self._tables.setdefault(
            (id(group), taken[0].device, taken[0].dtype), fused_cuda.Table()
        )
        lr = group["lr"]
        launched = fused_cuda.step_(
            table, taken, [p.grad for p in taken], [moms[p] for p in taken] if mu != 0 else None,
            [self._scales[p] for p in taken],
            lr=lr, momentum=mu, decay=1.0 - lr * group["weight_decay"], maximize=group["maximize"],
        )  # fmt: skip
        if launched:
            return left
        if group["fused"]:
            raise RuntimeError(f"SGDSaI(fused=True): {fused_cuda.failure()}")
        return params

    def _fused_update(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """The one-pass CPU kernel over ``params`` (one device and dtype) where it applies;
        False leaves them to the foreach / loop path."""
        kernel = _kernel_for([group]) if _fusable(group, params[0]) else None
        if kernel is None:
            return False
        mu = group["momentum"]
        grads = [p.grad for p in params]
        moms = [self.state[p]["momentum_buffer"] for p in params] if mu != 0 else []
        if not all(t.is_contiguous() for t in (*params, *grads, *moms)):
            return False
        lr = group["lr"]
        kernel.sgd_sai_step_(
            params, grads, moms, [self._scales[p] for p in params],
            lr, mu, 1.0 - lr * group["weight_decay"], group["maximize"], False,
        )  # fmt: skip
        return True

    # ----------------------------------------------------------------------------- read-out
    def gsnr_table(self, names: dict[Tensor, str] | None = None) -> list[dict[str, Any]]:
        """Per-block g-SNR and scale, in param-group order (reads the device: not in a loop).

        ``names`` maps parameters to names (e.g. ``{p: n for n, p in model.named_parameters()}``);
        unnamed blocks are called ``group{g}.{i}``.
        """
        self._drain_in_flight()
        rows = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                st = self.state.get(p, {})
                initialised = bool(st["initialised"]) if "initialised" in st else False
                rows.append(
                    dict(
                        name=(names or {}).get(p, f"group{gi}.{pi}"),
                        shape=tuple(p.shape),
                        numel=p.numel(),
                        initialised=initialised,
                        degenerate=bool(st["degenerate"]) if initialised else False,
                        gsnr=float(st["gsnr"]) if initialised else None,
                        scale=float(st["scale"]) if initialised else None,
                        lr=group["lr"],
                    )
                )
        return rows


def _sgd_sai_update(
    thetas: list[Tensor],
    grads: list[Tensor],
    moms: list[Tensor] | None,
    scales: list[Tensor] | list[float],
    *,
    lr: float,
    momentum: float,
    decay: float,
    maximize: bool,
    foreach: bool,
) -> None:
    """The steady-state update. ``scales`` are 0-dim tensors (in-place addcmul) or floats
    (scaled temporary); the foreach and loop paths run the same ops in the same order."""
    as_tensors = bool(scales) and isinstance(scales[0], Tensor)
    if foreach:
        if maximize:
            grads = torch._foreach_neg(grads)
        if moms is not None:
            torch._foreach_lerp_(moms, grads, 1.0 - momentum)
        direction = moms if moms is not None else grads
        if decay != 1.0:
            torch._foreach_mul_(thetas, decay)
        if as_tensors:
            torch._foreach_addcmul_(thetas, direction, scales, value=-lr)
        else:
            torch._foreach_add_(thetas, torch._foreach_mul(direction, [-lr * s for s in scales]))
        return
    for i, theta in enumerate(thetas):
        g = grads[i].neg() if maximize else grads[i]
        if moms is not None:
            moms[i].lerp_(g, 1.0 - momentum)
        direction = moms[i] if moms is not None else g
        if decay != 1.0:
            theta.mul_(decay)
        if as_tensors:
            theta.addcmul_(direction, scales[i], value=-lr)
        else:
            theta.add_(direction.mul(-lr * scales[i]))


def _fusable(group: dict[str, Any], p: Tensor) -> bool:
    """Whether the fused CPU kernel takes this group's block ``p`` (contiguity aside)."""
    return (
        group.get("fused") is not False
        and p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.float64)
    )


def _kernel_for(groups: Iterable[dict[str, Any]]):
    """The fused kernel, or None where it cannot be built; an error for ``fused=True``."""
    kernel = fused.cpu_kernel()
    if kernel is None and any(group.get("fused") for group in groups):
        raise RuntimeError(f"SGDSaI(fused=True): {fused.failure()}")
    return kernel


def _group_by_device_and_dtype(params: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())


def _chunks(params: list[Tensor], max_numel: int) -> list[list[Tensor]]:
    chunks, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > max_numel:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    if current:
        chunks.append(current)
    return chunks


def _check_hyperparameters(*, lr: float, momentum: float, weight_decay: float, eps: float) -> None:
    if isinstance(lr, Tensor):
        raise ValueError("SGDSaI: lr must be a Python float, not a tensor")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"SGDSaI: lr must be a finite number > 0, got {lr}")
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"SGDSaI: momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"SGDSaI: weight_decay must be a finite number >= 0, got {weight_decay}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"SGDSaI: eps must be a finite number >= 0, got {eps}")


def gsnr_table(optimizer: SGDSaI, named_params: Iterable[tuple[str, Tensor]] | None = None):
    """``optimizer.gsnr_table`` with names taken from ``model.named_parameters()``-style pairs."""
    names = {p: n for n, p in named_params} if named_params is not None else None
    return optimizer.gsnr_table(names)
