"""SGD-SaI on a device against the float64 reference: the same random parameters and gradients
stepped by ``tests/optim/reference.py`` (Algorithm 1 re-derived from the paper in float64 on the
CPU, independent of the code under test) and by ``SGDSaI`` on the device, through each of its
update paths; reported as the largest relative error of the parameters and of the g-SNR scales.

    python scripts/gpu_parity.py --device cuda --json parity.json
    python scripts/gpu_parity.py --device cpu --big-side 256   # the CPU's C++ fused path instead

Paths: ``fused`` (``fused=True``: on CUDA the Triton kernel of the steady steps, for every
dtype here; on the CPU the C++ one, for fp32, the others taking foreach), ``default``
(``fused=None``, what users get) and ``foreach`` (``fused=False``). Dtypes: fp32, bf16, fp16. Blocks: SD 1.5 LoRA factors (A's first gradient is zero, as when B starts at 0), a
4 M-element matrix (reductions across many kernel blocks), odd sizes, a conv kernel, a bias
whose first gradient is None, a one-element block and a constant-gradient block (both
degenerate: scale 1).

Tolerances start from tests/optim/test_sgd_sai.py's, set there for blocks of at most 128
entries: fp32 parameters within 1e-5 of the largest reference entry of their tensor, scales
1e-5 relative; bf16 and fp16 parameters, which the reference rounds after each step as the
optimizer does, 2e-2 in norm (one flipped rounding is an ulp). The g-SNR is summed in fp32 by
design, the rounding error of a sum grows about as sqrt(n), and every scale is a g-SNR over the
largest one: so the fp32 and scale tolerances are 1e-5 x max(1, sqrt(n / 1024)) for the largest
block's n, 6.4e-4 with the 4 M-entry block (torch's CPU reductions came to 1e-4 on it, the fused
C++ path to 1e-7). A wrong or missed block, a race or a lost reduction errs by far more.
``max_err_over_tol`` is the worst error over its tolerance; a path passes when it is at most 1.
Exits 1 when one does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from sai_diffusion.machine import describe_machine
from sai_diffusion.optim import SGDSaI, fused

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "optim" / "reference.py"
STEPS = 6
HYPERPARAMETERS = dict(lr=0.1, momentum=0.9, weight_decay=0.01, eps=1e-8)
PATHS = {"fused": dict(fused=True), "default": {}, "foreach": dict(foreach=True, fused=False)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARAM_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
SCALE_TOLERANCE = 1e-5
SUM_SIZE = 1024  # the block size below which the base tolerances hold as they are
# block index -> what its first gradient is
LORA_A, NONE_FIRST, CONSTANT_FIRST = (0, 2), 8, 10


def shapes(big_side: int) -> list[tuple[int, ...]]:
    return [
        (4, 320), (320, 4),      # LoRA A (first gradient zero) and B of a 320-wide projection
        (4, 1280), (1280, 4),    # the same at 1280
        (768, 768),
        (big_side, big_side),    # 4 M elements by default
        (1000, 77),              # no power of two
        (64, 32, 3, 3),          # a conv kernel
        (1280,),                 # its first gradient is None
        (1,),                    # one element: degenerate
        (16,),                   # its first gradient is constant: zero variance, degenerate
    ]  # fmt: skip


def size_factor(numel: int) -> float:
    """How much more a sum over ``numel`` fp32 entries may err than one over ``SUM_SIZE``."""
    return max(1.0, (numel / SUM_SIZE) ** 0.5)


def load_reference():
    """``tests/optim/reference.py``'s ``sgd_sai_reference`` (the tests' own oracle)."""
    if not REFERENCE.is_file():
        raise SystemExit(f"{REFERENCE} is missing: run this from a full checkout")
    spec = importlib.util.spec_from_file_location("sgd_sai_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.sgd_sai_reference


def gradient_steps(block_shapes: list, seed: int) -> list[list[torch.Tensor | None]]:
    """Float64 gradients, one list per step: each block its own magnitude (1e-2..1) and mean,
    so the g-SNRs differ; the first step holds the LoRA-A zeros, a None and a constant."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = [10 ** (-2 * torch.rand((), generator=gen).item()) for _ in block_shapes]
    mean = [2 * torch.rand((), generator=gen).item() - 1 for _ in block_shapes]
    steps = [
        [a * (c + torch.randn(s, generator=gen, dtype=torch.float64))
         for s, a, c in zip(block_shapes, magnitude, mean, strict=True)]
        for _ in range(STEPS)
    ]  # fmt: skip
    first = steps[0]
    for i in LORA_A:
        first[i] = torch.zeros_like(first[i])
    first[NONE_FIRST] = None
    first[CONSTANT_FIRST] = torch.full_like(first[CONSTANT_FIRST], 0.5)
    return steps


def as_seen(steps: list, dtype: torch.dtype) -> list:
    """The gradients exactly as the optimizer sees them (rounded to its dtype), in float64."""
    return [[None if g is None else g.to(dtype).double() for g in step] for step in steps]


def compare(
    path: str, name: str, device: torch.device, init: list, steps: list, ref, factor: float
) -> dict:
    """Step ``SGDSaI`` through ``path`` on ``device`` and measure it against ``ref``, with the
    fp32 and scale tolerances times ``factor``."""
    dtype = DTYPES[name]
    params = [torch.nn.Parameter(p.to(device, dtype)) for p in init]
    optimizer = SGDSaI(params, **PATHS[path], **HYPERPARAMETERS)
    start = time.perf_counter()
    for step in steps:
        for p, g in zip(params, step, strict=True):
            p.grad = None if g is None else g.to(device, dtype)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    param_err = scale_err = over_tol = 0.0
    flags_agree = True
    for i, p in enumerate(params):
        got, want = p.detach().double().cpu(), ref.params[i]
        if name == "fp32":  # entrywise, against the tensor's largest entry
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            tol = PARAM_TOLERANCE[name] * factor
        else:  # in norm: one flipped rounding is an ulp
            err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            tol = PARAM_TOLERANCE[name]
        param_err, over_tol = max(param_err, err), max(over_tol, err / tol)
        state = optimizer.state.get(p, {})
        initialised = bool(state["initialised"]) if "initialised" in state else False
        flags_agree &= initialised == ref.initialised[i]
        if ref.initialised[i] and initialised:
            err = abs(float(state["scale"]) - ref.scale[i]) / ref.scale[i]
            tol = SCALE_TOLERANCE * factor
            scale_err, over_tol = max(scale_err, err), max(over_tol, err / tol)
    return dict(path=path, dtype=name, max_rel_err=param_err, max_scale_rel_err=scale_err,
                max_err_over_tol=over_tol, initialised_flags_agree=flags_agree,
                seconds=seconds, passed=over_tol <= 1 and flags_agree)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--big-side", type=int, default=2048, help="side of the large matrix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    device = torch.device(args.device)
    sgd_sai_reference = load_reference()
    block_shapes = shapes(args.big_side)
    gen = torch.Generator().manual_seed(args.seed)
    init64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in block_shapes]
    steps = gradient_steps(block_shapes, args.seed + 1)
    factor = size_factor(max(p.numel() for p in init64))
    rows = []
    for name, dtype in DTYPES.items():
        init = [p.to(dtype).double() for p in init64]  # what the device starts from, exactly
        round_to = None if name == "fp32" else dtype
        ref = sgd_sai_reference(init, as_seen(steps, dtype), round_to=round_to, **HYPERPARAMETERS)
        for path in PATHS:
            if path == "fused" and device.type == "cpu" and fused.cpu_kernel() is None:
                rows.append(dict(path=path, dtype=name, skipped=fused.failure(), passed=True))
                continue
            try:
                rows.append(compare(path, name, device, init, steps, ref, factor))
            except Exception as err:  # a path that cannot run is a finding, not a crash
                rows.append(dict(path=path, dtype=name, passed=False,
                                 error=f"{type(err).__name__}: {err}"))  # fmt: skip
    passed = all(r["passed"] for r in rows)
    report = dict(device=str(device), machine=describe_machine(device),
                  reference=str(REFERENCE.relative_to(REFERENCE.parents[2])), steps=STEPS,
                  hyperparameters=HYPERPARAMETERS, shapes=block_shapes,
                  param_tolerance=PARAM_TOLERANCE, scale_tolerance=SCALE_TOLERANCE,
                  tolerance_factor=factor,  # for fp32 parameters and scales
                  results=rows, passed=passed)  # fmt: skip
    for r in rows:
        if "max_rel_err" in r:
            verdict = "ok" if r["passed"] else "FAILED"
            print(f"{r['path']:8} {r['dtype']}: params {r['max_rel_err']:.2e}, scales "
                  f"{r['max_scale_rel_err']:.2e}, worst / tolerance "
                  f"{r['max_err_over_tol']:.2f}: {verdict}")  # fmt: skip
        else:
            print(f"{r['path']:8} {r['dtype']}: {r.get('error') or 'skipped: ' + r['skipped']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
