"""Optimizer-step benchmark: SGD-SaI side by side with AdamW, SGD and the released SGD-SaI code.

For parameter sets shaped like real models (random values, random gradients) it measures, per
optimizer: the optimizer state it keeps (bytes, after the first step), its one-off first step
(for the SaI variants the g-SNR step) and the median steady-state step. Optimizers are timed
round-robin, each repeat stepping every optimizer once in a rotating order, so on a shared
machine they see the same load; every time is also given as a ratio to torch AdamW(foreach)
taken repeat by repeat in the same run.

    python scripts/bench_optimizer.py --set lora4,lora64,unet,gpt2xl --repeats 30 --json bench.json
    python scripts/bench_optimizer.py --device cuda --set lora4,lora64,gpt2xl:full \
        --optimizers sgd-sai,sgd-sai-foreach,adamw-fused,adamw-foreach,sgd-foreach

Parameter sets (``--size`` full | small | tiny; by default the LoRA sets are full size and the
whole-model sets are full on CUDA, small on CPU; ``name:size`` in ``--set`` sizes one set):
  lora4, lora64  LoRA rank 4 / 64 on every attention to_q, to_k, to_v, to_out.0 of the SD 1.5 UNet
  unet           every parameter of the SD 1.5 UNet (859.5 M at full size)
  gpt2xl         GPT-2 XL shapes (48 layers, d 1600, vocab 50257: 1.56 B at full size)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sai_diffusion._resources import configs_dir, sd15_config_dir
from sai_diffusion.config import DEFAULT_LORA_TARGETS
from sai_diffusion.machine import describe_machine
from sai_diffusion.optim import SGDSaI, build_optimizer, state_bytes

NamedParams = list[tuple[str, nn.Parameter]]

SETS = ("lora4", "lora64", "unet", "gpt2xl")
SIZES = ("full", "small", "tiny")

# ------------------------------------------------------------------------ parameter sets
# The SD 1.5 values that set parameter shapes; the shipped weight-free config must agree.
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    sample_size=64,
    in_channels=4,
    out_channels=4,
)
# small keeps every tensor of the UNet (686 of them) at 1/25 of the channels: 37.5 M parameters.
UNET_SIZES = {
    "full": {},
    "small": dict(block_out_channels=(64, 128, 256, 256)),
    "tiny": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32),
}

GPT2XL = dict(n_layer=48, n_embd=1600, vocab=50257, n_positions=1024)
# small keeps GPT-2 XL's real tensor shapes with 2 of its 48 layers: 143 M parameters.
GPT2_SIZES = {
    "full": {},
    "small": dict(n_layer=2),
    "tiny": dict(n_layer=1, n_embd=64, vocab=1000, n_positions=128),
}


@dataclass
class ParamSet:
    name: str
    size: str
    description: str
    shapes: list[tuple[str, tuple[int, ...]]]
    lora: bool

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)


def sd15_unet_config(size: str) -> tuple[dict, str]:
    """SD 1.5 UNet config (the shipped weight-free one) scaled to ``size``, and its source."""
    from diffusers import UNet2DConditionModel

    folder = sd15_config_dir() / "unet"
    config = dict(UNet2DConditionModel.load_config(folder))
    source = str(folder.relative_to(configs_dir().parent) / "config.json")
    changed = [k for k, v in SD15_UNET.items() if _as_tuple(config.get(k)) != v]
    if changed:
        print(f"warning: {source} differs from SD 1.5 in {changed}", file=sys.stderr)
    return {**config, **UNET_SIZES[size]}, source


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def unet_shapes(size: str, lora_rank: int | None) -> tuple[list, str]:
    """Trainable parameter shapes of the (LoRA-adapted) SD 1.5 UNet, without allocating it."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from sai_diffusion.models.lora import add_lora

    config, source = sd15_unet_config(size)
    # meta tensors: the shapes without the 3.4 GB of weights (building takes ~0.5 s)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        if lora_rank is not None:
            add_lora(unet, rank=lora_rank, alpha=lora_rank)  # the default targets; freezes the rest
    shapes = [(n, tuple(p.shape)) for n, p in unet.named_parameters() if p.requires_grad]
    return shapes, source


def gpt2_shapes(n_layer: int, n_embd: int, vocab: int, n_positions: int) -> list:
    """GPT-2 parameter shapes as Hugging Face stores them (Conv1D weights are (in, out))."""
    d = n_embd
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_positions, d))]
    for i in range(n_layer):
        shapes += [
            (f"h.{i}.{name}", shape)
            for name, shape in [
                ("ln_1.weight", (d,)),
                ("ln_1.bias", (d,)),
                ("attn.c_attn.weight", (d, 3 * d)),
                ("attn.c_attn.bias", (3 * d,)),
                ("attn.c_proj.weight", (d, d)),
                ("attn.c_proj.bias", (d,)),
                ("ln_2.weight", (d,)),
                ("ln_2.bias", (d,)),
                ("mlp.c_fc.weight", (d, 4 * d)),
                ("mlp.c_fc.bias", (4 * d,)),
                ("mlp.c_proj.weight", (4 * d, d)),
                ("mlp.c_proj.bias", (d,)),
            ]
        ]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]  # lm_head is tied to wte


def build_param_set(name: str, size: str) -> ParamSet:
    if name in ("lora4", "lora64"):
        rank = int(name.removeprefix("lora"))
        shapes, source = unet_shapes(size, lora_rank=rank)
        desc = f"SD 1.5 UNet LoRA r={rank} on {'/'.join(DEFAULT_LORA_TARGETS)} ({size}; {source})"
        return ParamSet(name, size, desc, shapes, lora=True)
    if name == "unet":
        shapes, source = unet_shapes(size, lora_rank=None)
        return ParamSet(
            name, size, f"SD 1.5 UNet, all parameters ({size}; {source})", shapes, False
        )
    config = {**GPT2XL, **GPT2_SIZES[size]}
    desc = "GPT-2 XL shapes ({size}: {n_layer} layers, d {n_embd}, vocab {vocab})".format(
        size=size, **config
    )
    return ParamSet(name, size, desc, gpt2_shapes(**config), lora=False)


def materialise(param_set: ParamSet, device: torch.device, seed: int) -> NamedParams:
    """Random fp32 parameters with random normal gradients, the same for every optimizer."""
    gen = torch.Generator(device=device).manual_seed(seed)
    named = []
    for name, shape in param_set.shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=device).mul_(0.02))
        p.grad = torch.randn(shape, generator=gen, device=device)
        named.append((name, p))
    return named


# ---------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    build: Callable[[NamedParams, float, float], torch.optim.Optimizer]
    state_per_param: int  # buffers the size of the parameters it keeps (memory estimate)
    # fp32 words the update must read and write per parameter: its floor is this traffic at the
    # machine's copy bandwidth (SGD momentum / SGD-SaI: read p, g, m, write p, m; AdamW: + v)
    words_moved: int = 5
    lora_only: bool = False
    mutates_grads: bool = False  # peft's preconditioner rewrites .grad in place
    module: str | None = None  # optional package it needs


def _params(named: NamedParams) -> list[nn.Parameter]:
    return [p for _, p in named]


def _sgd_sai_released(named, lr, wd):
    from sgd_sai import SGD_sai

    return SGD_sai(_params(named), lr=lr, momentum=0.9, weight_decay=wd)


def _sgd_sai_pytorch_optimizer(named, lr, wd):
    from pytorch_optimizer import SGDSaI as PyOptSGDSaI

    return PyOptSGDSaI(_params(named), lr=lr, momentum=0.9, weight_decay=wd, foreach=True)


CANDIDATES = [
    Candidate(
        "sgd-sai",
        "SGD-SaI (ours, fused: the default)",
        lambda named, lr, wd: SGDSaI(_params(named), lr=lr, momentum=0.9, weight_decay=wd),
        state_per_param=1,
    ),
    Candidate(
        "sgd-sai-foreach",
        "SGD-SaI (ours, foreach)",
        lambda named, lr, wd: SGDSaI(
            _params(named), lr=lr, momentum=0.9, weight_decay=wd, foreach=True, fused=False
        ),
        state_per_param=1,
    ),
    Candidate(
        "adamw-foreach",
        "AdamW (torch, foreach)",
        lambda named, lr, wd: torch.optim.AdamW(
            _params(named), lr=lr, weight_decay=wd, foreach=True
        ),
        state_per_param=2,
        words_moved=7,
    ),
    Candidate(
        "adamw-fused",
        "AdamW (torch, fused)",
        lambda named, lr, wd: torch.optim.AdamW(_params(named), lr=lr, weight_decay=wd, fused=True),
        state_per_param=2,
        words_moved=7,
    ),
    Candidate(
        "sgd-foreach",
        "SGD momentum (torch, foreach)",
        lambda named, lr, wd: torch.optim.SGD(
            _params(named), lr=lr, momentum=0.9, weight_decay=wd, foreach=True
        ),
        state_per_param=1,
    ),
    Candidate(
        "sgd-sai-1.0.3",
        "sgd-sai 1.0.3 (released)",
        _sgd_sai_released,
        state_per_param=1,
        module="sgd_sai",
    ),
    Candidate(
        "pyopt-sgdsai",
        "pytorch-optimizer SGDSaI (foreach)",
        _sgd_sai_pytorch_optimizer,
        state_per_param=1,
        module="pytorch_optimizer",
    ),
    Candidate(
        "scaled-adamw",
        "scaled-AdamW (peft, build_optimizer)",
        lambda named, lr, wd: build_optimizer("scaled-adamw", named, lr=lr, weight_decay=wd),
        state_per_param=2,
        words_moved=7,  # AdamW's traffic; its r x r preconditioner solves are extra
        lora_only=True,
        mutates_grads=True,
    ),
]
BASELINE = "adamw-foreach"
FUSED_ADAMW = "adamw-fused"


def copy_bandwidth(device: torch.device, *, mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second of a large ``copy_`` (read + write counted), median of ``repeats``:
    the memory bandwidth an elementwise update can hope for on this machine. Timed as the
    steps are (``timed_step``): on CUDA with events, since 256 MiB copy in about 0.2 ms there,
    which a host timer around two synchronisations would overstate."""
    src = torch.rand(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = [timed_call(lambda: dst.copy_(src), device) for _ in range(repeats + 1)]
    return 2 * src.numel() * src.element_size() / statistics.median(times[1:])  # 1st: paging


def unavailable_reason(candidate: Candidate, device: torch.device) -> str | None:
    """Why ``candidate`` cannot run here (None if it can): missing package, unsupported kernel."""
    if candidate.module is not None and importlib.util.find_spec(candidate.module) is None:
        return f"package {candidate.module!r} is not installed (pip install -e '.[dev]')"
    if candidate.key == "adamw-fused":
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.ones_like(p)
        try:
            torch.optim.AdamW([p], fused=True).step()
        except (RuntimeError, NotImplementedError) as err:
            return f"fused AdamW does not run on {device.type}: {err}"
    return None


# ----------------------------------------------------------------------------- measuring
def timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds of one ``optimizer.step()``, host work and device work together."""
    return timed_call(optimizer.step, device)


def timed_call(call: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``call()``: CUDA events around it on CUDA (from an idle device to the end of
    its last kernel, the host's launch work included), the host clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


@dataclass
class Measured:
    candidate: Candidate
    first_step_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    state_bytes: int = 0
    optimizer: torch.optim.Optimizer | None = None


def measure(
    named: NamedParams,
    candidates: list[Candidate],
    device: torch.device,
    *,
    lr: float,
    weight_decay: float,
    first_repeats: int,
    warmup: int,
    repeats: int,
) -> dict[str, Measured]:
    """Round-robin first steps (fresh optimizers), then round-robin steady-state steps."""
    grads = [p.grad for _, p in named]
    # scaled-AdamW preconditions .grad in place; the others must keep seeing the same gradients
    pristine = [g.clone() for g in grads] if any(c.mutates_grads for c in candidates) else None
    runs = {c.key: Measured(c) for c in candidates}

    def step(run: Measured) -> float:
        seconds = timed_step(run.optimizer, device)
        if run.candidate.mutates_grads:
            torch._foreach_copy_(grads, pristine)
        return seconds

    for r in range(first_repeats):
        for run in rotated(list(runs.values()), r):
            run.optimizer = None  # free the previous round's state before building anew
            run.optimizer = run.candidate.build(named, lr, weight_decay)
            with contextlib.redirect_stdout(io.StringIO()):  # sgd-sai 1.0.3 prints a banner
                run.first_step_s.append(step(run))
            run.state_bytes = state_bytes(run.optimizer)

    for r in range(warmup + repeats):
        for run in rotated(list(runs.values()), r):
            seconds = step(run)
            if r >= warmup:
                run.step_s.append(seconds)
    return runs


# ------------------------------------------------------------------------------- results
def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(
    runs: dict[str, Measured], baseline: str, *, numel: int, bandwidth: float
) -> list[dict]:
    """Per optimizer: medians, the floor (its traffic at ``bandwidth``), and per-repeat ratios
    to the baseline (same repeat, same load)."""
    base = runs.get(baseline)
    rows = []
    for key, run in runs.items():
        floor_s = numel * 4 * run.candidate.words_moved / bandwidth
        row = dict(
            key=key,
            label=run.candidate.label,
            state_bytes=run.state_bytes,
            first_step_s=statistics.median(run.first_step_s),
            first_step_s_all=run.first_step_s,
            step_s=statistics.median(run.step_s),
            step_s_iqr=quantiles(run.step_s)[::2],
            step_s_all=run.step_s,
            floor_s=floor_s,
            step_vs_floor=statistics.median(run.step_s) / floor_s,
        )
        if base is not None:
            row["state_vs_adamw"] = run.state_bytes / base.state_bytes
            ratios = [t / b for t, b in zip(run.step_s, base.step_s, strict=True)]
            q1, q2, q3 = quantiles(ratios)
            row.update(step_vs_adamw=q2, step_vs_adamw_iqr=(q1, q3))
        rows.append(row)
    return rows


def step_ratio(runs: dict[str, Measured], key: str, other: str) -> tuple[float, float, float]:
    """Quartiles of the per-repeat step-time ratio ``key`` / ``other``."""
    pairs = zip(runs[key].step_s, runs[other].step_s, strict=True)
    return quantiles([a / b for a, b in pairs])


def check_targets(param_set: ParamSet, runs: dict[str, Measured]) -> list[dict]:
    """The project's acceptance targets for SGD-SaI that this set can check."""
    checks = []
    if "sgd-sai" not in runs or BASELINE not in runs:
        return checks
    state = runs["sgd-sai"].state_bytes / runs[BASELINE].state_bytes
    checks.append(
        dict(target="state = 0.5x AdamW(foreach)", value=state, met=abs(state - 0.5) <= 0.01)
    )
    if FUSED_ADAMW in runs:
        q1, q2, q3 = step_ratio(runs, "sgd-sai", FUSED_ADAMW)
        checks.append(
            dict(target="step <= 0.8x AdamW(fused)", value=q2, iqr=(q1, q3), met=q2 <= 0.8)
        )
    sai = runs["sgd-sai"]
    first = statistics.median(sai.first_step_s) / statistics.median(sai.step_s)
    checks.append(dict(target="first (g-SNR) step <= 2 steady steps", value=first, met=first <= 2))
    if param_set.lora:
        q1, q2, q3 = step_ratio(runs, "sgd-sai", BASELINE)
        checks.append(
            dict(target="step <= 1.0x AdamW(foreach)", value=q2, iqr=(q1, q3), met=q2 <= 1.0)
        )
        if "sgd-foreach" in runs:
            q1, q2, q3 = step_ratio(runs, "sgd-sai", "sgd-foreach")
            checks.append(
                dict(
                    target="step <= 1.3x SGD(momentum, foreach)",
                    value=q2,
                    iqr=(q1, q3),
                    met=q2 <= 1.3,
                )
            )
    return checks


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f}" if nbytes >= 2**20 else f"{nbytes / 2**20:.3f}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| optimizer | state MiB | state / AdamW | first step ms | step ms (median [IQR]) "
        "| step / AdamW (median [IQR]) | floor ms | step / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lo, hi = row["step_s_iqr"]
        state_ratio = f"{row['state_vs_adamw']:.3f}" if "state_vs_adamw" in row else "-"
        ratio = "-"
        if "step_vs_adamw" in row:
            rlo, rhi = row["step_vs_adamw_iqr"]
            ratio = f"{row['step_vs_adamw']:.2f} [{rlo:.2f}, {rhi:.2f}]"
        lines.append(
            f"| {row['label']} | {_mb(row['state_bytes'])} | {state_ratio} "
            f"| {_ms(row['first_step_s'])} | {_ms(row['step_s'])} [{_ms(lo)}, {_ms(hi)}] "
            f"| {ratio} | {_ms(row['floor_s'])} | {row['step_vs_floor']:.1f} |"
        )
    return "\n".join(lines)


def format_checks(checks: list[dict]) -> str:
    lines = []
    for check in checks:
        spread = " (IQR {:.2f}-{:.2f})".format(*check["iqr"]) if "iqr" in check else ""
        verdict = "met" if check["met"] else "NOT met"
        lines.append(f"- SGD-SaI {check['target']}: {check['value']:.3f}{spread}: {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def check_memory(param_set: ParamSet, candidates: list[Candidate], device: torch.device) -> None:
    """Refuse a run that would not fit: all optimizers' states live side by side."""
    # parameters + gradients + every state + the temporaries of the one optimizer stepping
    # (AdamW foreach allocates about one parameter-sized list; keep a second for the allocator)
    buffers = 2 + sum(c.state_per_param for c in candidates) + 2
    need, have = param_set.numel * 4 * buffers, available_bytes(device)
    if need > 0.9 * have:
        raise SystemExit(
            f"{param_set.name} ({param_set.size}, {param_set.numel / 1e6:,.0f} M params) needs about "
            f"{need / 2**30:.1f} GiB with {len(candidates)} optimizers side by side; "
            f"{have / 2**30:.1f} GiB is free on {device.type}. Use --size small, fewer "
            f"--optimizers, or a larger device."
        )


def parse_sets(spec: str, size: str | None, device: torch.device) -> list[tuple[str, str]]:
    """``lora4,unet:small`` -> [(name, size)], filling in the default size per set and device."""
    chosen = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, own_size = item.partition(":")
        if name not in SETS:
            raise SystemExit(f"unknown parameter set {name!r}; choose from {', '.join(SETS)}")
        own_size = own_size or size
        if own_size is None:  # whole models are too big for a CPU run by default
            own_size = "full" if name.startswith("lora") or device.type == "cuda" else "small"
        if own_size not in SIZES:
            raise SystemExit(
                f"unknown size {own_size!r} in {item!r}; choose from {', '.join(SIZES)}"
            )
        chosen.append((name, own_size))
    return chosen


def select_candidates(keys: str | None, param_set: ParamSet, device: torch.device) -> list:
    valid = [c.key for c in CANDIDATES]
    wanted = valid if keys is None else [k.strip() for k in keys.split(",") if k.strip()]
    for key in wanted:
        if key not in valid:
            raise SystemExit(f"unknown optimizer {key!r}; choose from {', '.join(valid)}")
    chosen = []
    for c in CANDIDATES:
        if c.key not in wanted or (c.lora_only and not param_set.lora):
            continue
        reason = unavailable_reason(c, device)
        if reason is not None:
            print(f"skipping {c.label}: {reason}", file=sys.stderr)
            continue
        chosen.append(c)
    return chosen


def bench_set(param_set: ParamSet, device: torch.device, args: argparse.Namespace) -> dict:
    """Measure every selected optimizer on one parameter set; print and return the results."""
    candidates = select_candidates(args.optimizers, param_set, device)
    check_memory(param_set, candidates, device)
    named = materialise(param_set, device, args.seed)
    started = time.perf_counter()
    gc.collect()
    gc.disable()  # a collection inside one optimizer's timed step would bias it (as timeit)
    try:
        runs = measure(
            named,
            candidates,
            device,
            lr=args.lr,
            weight_decay=args.weight_decay,
            first_repeats=args.first_repeats,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    finally:
        gc.enable()
    if not all(torch.isfinite(p).all() for _, p in named):
        print(f"warning: {param_set.name}: parameters went non-finite; lower --lr", file=sys.stderr)
    rows = summarise(runs, BASELINE, numel=param_set.numel, bandwidth=args.bandwidth)
    checks = check_targets(param_set, runs)
    print(
        f"### {param_set.name}: {param_set.description}\n\n{param_set.numel:,} parameters in "
        f"{len(param_set.shapes)} tensors ({_mb(param_set.numel * 4)} MiB fp32); "
        f"{time.perf_counter() - started:.0f} s\n\n{markdown_table(rows)}\n"
    )
    if checks:
        print(format_checks(checks) + "\n")
    sys.stdout.flush()
    return dict(
        name=param_set.name,
        size=param_set.size,
        description=param_set.description,
        numel=param_set.numel,
        tensors=len(param_set.shapes),
        results=rows,
        targets=checks,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set",
        default="lora4,lora64,unet,gpt2xl",
        help="comma list: " + ",".join(SETS) + " (name:size sizes one set)",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default=None,
        help="default: full for LoRA sets and on CUDA, small otherwise",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma list of keys: " + ",".join(c.key for c in CANDIDATES),
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before them")
    parser.add_argument(
        "--first-repeats", type=int, default=3, help="fresh optimizers per first-step time"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="same for every optimizer")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every timing here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.first_repeats < 1:
        parser.error("--repeats and --first-repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: torch sees no CUDA device (this torch is " + torch.__version__ + ")"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = dict(
        command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        machine=describe_machine(device),
        settings=dict(
            repeats=args.repeats,
            warmup=args.warmup,
            first_repeats=args.first_repeats,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            momentum=0.9,
            dtype="float32",
        ),
        sets=[],
    )
    chosen = parse_sets(args.set, args.size, device)
    args.bandwidth = report["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
    print(f"machine: {report['machine']}")
    print(f"copy bandwidth (256 MiB copy_, read + write): {args.bandwidth / 1e9:.1f} GB/s\n")

    for name, size in chosen:
        report["sets"].append(bench_set(build_param_set(name, size), device, args))
        gc.collect()  # free this set's parameters and states before the next one
        if device.type == "cuda":  # and hand them back, so the next set's check sees them free
            torch.cuda.empty_cache()

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
