"""SGD-SaI's steady step on CUDA: one Triton kernel launch per (param group, dtype) per step.

For every block i whose scale is known (docs/dev/optimizer-spec.md, "The fused CUDA update"),
per element, in fp32:

    g <- -g if maximize
    m <- m + (1 - mu) (g - m)             (torch's lerp_; momentum 0: no buffer, m = g)
    p <- p (1 - lr wd) - (lr scale_i) m   (written back rounded once to p's dtype)

It reads p, g, m and writes p, m: 20 bytes per fp32 parameter, 14 per bf16 / fp16 one (the
momentum is fp32), where the foreach kernels move about 40. One launch covers every tensor of
a batch: each program reads its (tensor, first element) from a device table and that tensor's
addresses, size and scale from another (``Table``). The tables are built on the host from
``data_ptr()``s, pinned and copied without waiting; a step whose addresses did not change
(gradients freed by ``zero_grad`` usually come back at the same addresses) reuses them. Nothing
here waits for the device.

triton is imported on first use only: importing sai_diffusion never needs it. Where it is
missing, does not import, or a kernel's first launch fails (no C compiler for triton's launcher,
an unsupported GPU), ``triton_kernel()`` is None from then on, ``failure()`` says why, a
warning says so once, and SGDSaI uses the foreach kernels. ``SAI_FUSED=0`` turns this update
off as well as the CPU one.

The CPU tests run this very kernel through Triton's interpreter: ``TRITON_INTERPRET=1`` while
``triton_kernel()`` first builds it (one kernel is kept per mode). The interpreter truncates
fp32 -> bf16 where the GPU rounds to nearest even, so the kernel rounds bf16 by hand, on the
bits: both then round alike. FMA contraction is off for the same reason (numpy has none).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from .fused import enabled

# The parameter dtypes the kernel takes; the gradient has the parameter's dtype, the momentum is
# fp32. Anything else (fp64, a gradient of another dtype, a strided tensor) takes foreach.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements
_NUM_WARPS = 4
_ROW = 5  # int64 per tensor in the table: p, g, m addresses, numel, scale (float64 bits)

# triton.language, bound by _build(): the interpreter patches it among this module's globals
tl = None
_lock = threading.Lock()
_kernels: dict[bool, object] = {}  # interpreted?: the kernel built in that mode
_triton_dtypes: dict[torch.dtype, object] = {}
_launched: set[tuple] = set()  # the variants that launched once without an error
_failure: str | None = None


def failure() -> str:
    """Why ``triton_kernel()`` returned None, or ``step_`` False."""
    if not enabled():
        return "the fused update is turned off (SAI_FUSED=0)"
    return f"the fused CUDA update is not available ({_failure or 'not tried yet'})"


def triton_kernel():
    """The Triton kernel, built on first use in the mode ``TRITON_INTERPRET`` sets then, or
    None: turned off, triton missing or broken, or a failed first launch (warned once)."""
    if _failure is not None or not enabled():
        return None
    with _lock:
        try:
            import triton

            interpret = _interpreting(triton)
            if interpret not in _kernels:
                _kernels[interpret] = _build()
            return _kernels[interpret]
        except Exception as exc:  # not installed, or a triton that does not import here
            _turn_off(exc, "Install triton (pip install triton) to fix.")
            return None


def _interpreting(triton) -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; before, the variable alone
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _turn_off(exc: Exception, fix: str) -> None:
    global _failure
    text = str(exc).strip()
    _failure = text.splitlines()[0] if text else repr(exc)
    warnings.warn(
        f"SGD-SaI: the fused CUDA update cannot run ({_failure}); using the foreach update "
        f"(correct, slower). {fix}",
        RuntimeWarning,
        stacklevel=4,
    )


def fits(p: Tensor, grad: Tensor, momentum_buffer: Tensor | None) -> bool:
    """Whether the kernel can stream this block: p of a kernel dtype, the gradient of p's dtype,
    an fp32 momentum buffer (or none), all contiguous, of p's shape, on p's device."""
    tensors = [p, grad] if momentum_buffer is None else [p, grad, momentum_buffer]
    return (
        p.dtype in DTYPES
        and grad.dtype == p.dtype
        and (momentum_buffer is None or momentum_buffer.dtype == torch.float32)
        and all(t.is_contiguous() and t.shape == p.shape and t.device == p.device for t in tensors)
    )


class Table:
    """The device tables of one batch (one param group, device and dtype).

    ``rows``: (tensors, 5) int64: the p, g, m addresses, numel, the scale as float64 bits.
    ``work``: (programs, 2) int64: each program's row and first element. Rebuilt on the host
    and copied without waiting when an address, a size or a scale changed; kept otherwise.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.rows: Tensor | None = None
        self.work: Tensor | None = None
        self.programs = 0
        self.aligned = False  # every address a multiple of 16 bytes: 16-byte vector accesses

    def refresh(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        moms: Sequence[Tensor] | None,
        scales: Sequence[float],
    ) -> None:
        addresses = (
            tuple(p.data_ptr() for p in params),
            tuple(g.data_ptr() for g in grads),
            tuple(m.data_ptr() for m in moms) if moms is not None else (0,) * len(params),
        )
        numels = tuple(p.numel() for p in params)
        key = (addresses, numels, tuple(scales))
        if key == self._key:
            return
        numel = torch.tensor(numels, dtype=torch.int64)
        blocks = (numel + BLOCK - 1) // BLOCK
        owner = torch.repeat_interleave(torch.arange(len(params)), blocks)  # (programs,)
        first = torch.cumsum(blocks, 0) - blocks  # each tensor's first program
        start = (torch.arange(owner.numel()) - first[owner]) * BLOCK
        rows = torch.stack(
            [
                *(torch.tensor(column, dtype=torch.int64) for column in addresses),
                numel,
                torch.tensor(scales, dtype=torch.float64).view(torch.int64),
            ],
            dim=1,
        )  # (tensors, _ROW)
        host = torch.cat([rows.reshape(-1), torch.stack([owner, start], dim=1).reshape(-1)])
        # CUDA: a fresh pinned block every time (the caching host allocator keeps it until the
        # copy has read it: the host neither waits nor overwrites a copy in flight). The
        # interpreter reads host memory.
        cuda = params[0].device.type == "cuda"
        table = host.pin_memory().to(params[0].device, non_blocking=True) if cuda else host
        self.rows, self.work = table[: rows.numel()], table[rows.numel() :]
        self.programs = owner.numel()
        self.aligned = all(a % 16 == 0 for column in addresses for a in column)
        self._key = key


def step_(
    table: Table,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor] | None,
    scales: Sequence[float],
    *,
    lr: float,
    momentum: float,
    decay: float,
    maximize: bool,
) -> bool:
    """The steady update of ``params`` (one device and dtype, each ``fits``) in one launch.

    ``table`` is the batch's own, kept by the caller from step to step; ``moms`` is None for
    momentum 0. False: the kernel is not available, or its first launch failed before writing
    anything (``failure()`` says why), and the caller takes the foreach path.
    """
    kernel = triton_kernel()
    if kernel is None:
        return False
    device = params[0].device
    # the table's copy and the kernel on the current stream of the parameters' device, in order
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        table.refresh(params, grads, moms, scales)
        if table.programs == 0:  # empty tensors only
            return True
        variant = (kernel, params[0].dtype, moms is not None, maximize, table.aligned)
        args = dict(
            dtype=params[0].dtype, lr=lr, decay=decay, weight=1.0 - momentum,
            has_momentum=moms is not None, maximize=maximize,
        )  # fmt: skip
        if variant in _launched:
            _launch(kernel, table, **args)
            return True
        try:  # a variant's first launch compiles it: a failure there has written nothing
            _launch(kernel, table, **args)
        except Exception as exc:
            _turn_off(exc, "Check triton's requirements (a C compiler, a supported GPU).")
            return False
        _launched.add(variant)
    return True


def _launch(kernel, table: Table, *, dtype, lr, decay, weight, has_momentum, maximize) -> None:
    """One launch over every tensor of ``table`` (the tests count calls of this function)."""
    kernel[(table.programs,)](
        table.rows, table.work, lr, decay, weight,
        P=_triton_dtypes[dtype], HAS_MOMENTUM=has_momentum, MAXIMIZE=maximize,
        ALIGNED=table.aligned, BLOCK=BLOCK, num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # round where the foreach kernels and the interpreter do
    )  # fmt: skip


def _build():
    """Define the kernel (triton is imported here, not with this module). One function without
    jit helpers: the interpreter looks callees up among the module's globals, where a kernel
    built in the other mode would have replaced them."""
    global tl
    import triton
    import triton.language as tl

    _triton_dtypes.update(
        {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    )

    @triton.jit
    def sgd_sai_kernel(
        rows, work, lr, decay, weight,
        P: tl.constexpr, HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        row = rows + 5 * tl.load(work + 2 * pid)  # 5: _ROW
        start = tl.multiple_of(tl.load(work + 2 * pid + 1), BLOCK)  # k * BLOCK
        p_ptr = tl.load(row).to(tl.pointer_type(P))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(P))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        numel = tl.load(row + 3)
        step = lr * tl.load(row + 4).to(tl.float64, bitcast=True).to(tl.float32)
        if ALIGNED:  # the host checked every address
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
        offs = start + tl.arange(0, BLOCK)
        full = start + BLOCK <= numel
        # the body twice, at compile time: a full block without a mask (its loads and stores
        # vectorise), a tensor's last block with one
        for TAIL in tl.static_range(2):
            if full != TAIL:
                mask = offs < numel if TAIL else None
                p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
                g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
                if MAXIMIZE:
                    g = -g
                if HAS_MOMENTUM:
                    m = tl.load(m_ptr + offs, mask=mask)
                    # torch's lerp_(g, weight), each branch as torch computes it
                    diff = g - m
                    m = tl.where(weight < 0.5, m + weight * diff, g - diff * (1.0 - weight))
                    tl.store(m_ptr + offs, m, mask=mask)
                else:
                    m = g
                p = p * decay - step * m
                if P.is_bf16():
                    # round to nearest even on the bits; a NaN stays a quiet NaN
                    bits = p.to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                    bits = tl.where(p != p, 0x7FC0, bits)
                    out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                else:
                    out = p.to(P)
                tl.store(p_ptr + offs, out, mask=mask)

    return sgd_sai_kernel
