"""The alternative to the fused C++ update that issue 16 asked to measure: SGD-SaI's steady step
(lerp, decay, scaled add) as one ``torch.compile``d (inductor) function over a parameter set of
scripts/bench_optimizer.py. Prints its compile time and median step; compare with that script's
"SGD-SaI (ours, fused)" row.

    python scripts/bench_compiled_update.py --set lora4 --size full
    python scripts/bench_compiled_update.py --set unet --size small
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_optimizer import SETS, SIZES, build_param_set, materialise


def update(params, grads, moms, scales, lr: float, weight: float, decay: float) -> None:
    for p, g, m, s in zip(params, grads, moms, scales, strict=True):
        m.lerp_(g, weight)
        p.mul_(decay).add_(m, alpha=-lr * s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=SETS, default="lora4")
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    named = materialise(build_param_set(args.set, args.size), torch.device("cpu"), 0)
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    moms = [torch.zeros_like(p) for p in params]
    scales = [0.5] * len(params)
    compiled = torch.compile(update)
    with torch.no_grad():
        start = time.perf_counter()
        compiled(params, grads, moms, scales, 1e-4, 0.1, 1 - 1e-6)
        print(f"{args.set} ({args.size}): compile {time.perf_counter() - start:.1f} s")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(params, grads, moms, scales, 1e-4, 0.1, 1 - 1e-6)
            times.append(time.perf_counter() - start)
    print(f"compiled update: {statistics.median(times) * 1e3:.2f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
