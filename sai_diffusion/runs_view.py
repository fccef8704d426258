"""What a folder of runs says about how they trained: which runs there are (named and grouped
for a picker), each run's loss curve, SGD-SaI's per-block g-SNR scales, and what a step cost
(time, memory, optimizer state).

Read-only views over the files ``sai-train-lora`` writes (``run.yaml``, ``metrics.jsonl``,
``gsnr.json``, ``checkpoints/*/optimizer.pt``, ``lora.safetensors``), for the app and reports.
A run may still be training, so a missing file or a torn last line gives an empty view, never
an exception.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import RunInfo

# ------------------------------------------------------------------------------ the run list


def index_runs(root: Path) -> dict[str, RunInfo]:
    """Every run under ``root`` keyed by its path relative to ``root`` (``potter/sgd-sai-...``),
    which stays unique where folder names repeat across concepts. Folders that are not runs
    are left out (see ``compare.find_runs``)."""
    from .compare import find_runs

    root = Path(root).expanduser().resolve()
    index = {}
    for info in find_runs(root):
        try:
            key = info.path.relative_to(root).as_posix()
        except ValueError:  # a run reached through a symlink out of root: keep its name
            key = info.name
        index[key if key != "." else info.name] = info
    return index


def run_label(info: RunInfo) -> str:
    """``potter · sgd-sai lr=0.1 · 1750 steps`` (``· unfinished`` when it has no LoRA yet)."""
    label = f"{info.concept} · {info.optimizer} lr={info.lr:g} · {info.steps} steps"
    return label if info.has_lora else f"{label} · unfinished"


def run_labels(index: dict[str, RunInfo]) -> dict[str, str]:
    """``run_label`` for every run; where two read the same, the run's key is appended."""
    labels = {key: run_label(info) for key, info in index.items()}
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {k: f"{v} · {k}" if seen[v] > 1 else v for k, v in labels.items()}


def base_identity(info: RunInfo) -> str:
    """The base model's content hash where known, else its path: runs that can share a grid."""
    return info.base_model_hash or f"path:{info.base_model}"


def group_runs(index: dict[str, RunInfo]) -> dict[str, list[str]]:
    """Run keys grouped by concept and base model, under labels like ``potter · on
    chilloutmix.safetensors`` (with a short hash where two bases share a file name)."""
    names: dict[str, set[str]] = {}
    for info in index.values():
        names.setdefault(_base_name(info), set()).add(base_identity(info))
    groups: dict[str, list[str]] = {}
    for key, info in sorted(index.items(), key=lambda kv: (kv[1].concept, _base_name(kv[1]))):
        base = _base_name(info)
        if len(names[base]) > 1:
            base += f" ({base_identity(info).split(':')[-1][:8]})"
        groups.setdefault(f"{info.concept} · on {base}", []).append(key)
    return groups


def _base_name(info: RunInfo) -> str:
    return Path(str(info.base_model)).name if info.base_model else "unknown base"


# ---------------------------------------------------------------------------------- metrics


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in step order; unreadable lines are skipped (a line
    being written while we read is torn)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return sorted(records, key=lambda r: r["step"])


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing, so the first points are not
    pulled towards zero. ``smoothing`` in [0, 1): 0 returns the values, 0.99 is very smooth."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = smoothing * avg + (1 - smoothing) * value
        out.append(avg / (1 - smoothing**i))
    return out


@dataclass
class LossCurve:
    steps: list[int]
    loss: list[float]
    smoothed: list[float]


def loss_curve(run_dir: Path, *, smoothing: float = 0.9) -> LossCurve:
    """Loss against step, raw and EMA-smoothed; empty lists before the first logged step."""
    records = [r for r in read_metrics(run_dir) if isinstance(r.get("loss"), int | float)]
    losses = [float(r["loss"]) for r in records]
    return LossCurve([r["step"] for r in records], losses, ema(losses, smoothing))


# -------------------------------------------------------------------------------- g-SNR


def read_gsnr(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``gsnr.json`` (one per trained tensor: name, numel, scale, ...); [] when the
    run did not use SGD-SaI or has not finished."""
    try:
        rows = json.loads((Path(run_dir) / "gsnr.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    return (
        [r for r in rows if isinstance(r, dict) and "name" in r] if isinstance(rows, list) else []
    )


@dataclass(frozen=True)
class BlockKey:
    """Where a LoRA tensor sits: ``down_blocks.1`` / ``attn2`` / ``q`` / ``A``."""

    block: str  # down_blocks.1, mid_block, up_blocks.2, text_encoder.layers.3, token embedding
    attn: str  # attn1 (self), attn2 (cross), self_attn (text encoder), or ""
    proj: str  # q, k, v, out, or the module name for other targets
    factor: str  # A (down), B (up), or "" for a non-LoRA tensor


_UNET_BLOCK = re.compile(r"(?:^|\.)(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.")
_TEXT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ATTN = re.compile(r"\.(attn\d|self_attn)\.")
_PROJ = re.compile(r"\.(?:to_(q|k|v|out)|(q|k|v|out)_proj)(?:\.|$)")


def block_key(name: str) -> BlockKey:
    """Parse a trained tensor's name, e.g.
    ``unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.lora_B.default.weight``
    -> ``BlockKey("up_blocks.2", "attn2", "k", "B")``."""
    if name.endswith(".vectors") or "token_embedding" in name:
        return BlockKey("token embedding", "", "", "")
    if m := _UNET_BLOCK.search(name):
        block = m.group(1)
    elif name.startswith("text_encoder") and (m := _TEXT_LAYER.search(name)):
        block = f"text_encoder.layers.{m.group(1)}"
    else:
        block = name.split(".lora")[0].rsplit(".", 1)[0]
    attn = m.group(1) if (m := _ATTN.search(name)) else ""
    if m := _PROJ.search(name):
        proj = m.group(1) or m.group(2)
    else:  # another lora target (proj_in, ff.net.0.proj, ...): the module's last name
        proj = name.split(".lora")[0].rsplit(".", 1)[-1]
    if ".lora_A." in name or ".lora.down." in name:
        factor = "A"
    elif ".lora_B." in name or ".lora.up." in name:
        factor = "B"
    else:
        factor = ""
    return BlockKey(block, attn, proj, factor)


@dataclass
class BlockScale:
    """SGD-SaI's lr scale over the tensors of one block (every attention and transformer block
    of ``down_blocks.1`` that has an ``attn2.to_k`` LoRA A, say)."""

    key: BlockKey
    mean: float
    low: float
    high: float
    count: int


_PROJ_ORDER = {"q": 0, "k": 1, "v": 2, "out": 3}


def _block_order(block: str) -> tuple[int, int, str]:
    """UNet order (down, mid, up), then the text encoder, then anything else."""
    kind, _, index = block.partition(".")
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(kind)
    if rank is not None:
        return (rank, int(index) if index.isdigit() else 0, "")
    if block.startswith("text_encoder.layers."):
        return (3, int(block.rsplit(".", 1)[1]), "")
    return (4, 0, block)


def gsnr_by_block(rows: list[dict[str, Any]]) -> tuple[list[BlockScale], int]:
    """Group ``gsnr.json`` rows by (block, attention, projection, LoRA factor) in UNet order.

    Returns the groups and the number of tensors without a scale (never given a non-zero
    gradient, so SGD-SaI never fixed their step; such a tensor did not train).
    """
    groups: dict[BlockKey, list[float]] = {}
    missing = 0
    for row in rows:
        scale = row.get("scale")
        if not row.get("initialised") or not isinstance(scale, int | float):
            missing += 1
            continue
        groups.setdefault(block_key(row["name"]), []).append(float(scale))
    ordered = sorted(
        groups.items(),
        key=lambda kv: (
            _block_order(kv[0].block),
            kv[0].attn,
            _PROJ_ORDER.get(kv[0].proj, 9),
            kv[0].proj,
            kv[0].factor,
        ),
    )
    return [
        BlockScale(key, statistics.fmean(v), min(v), max(v), len(v)) for key, v in ordered
    ], missing


# ---------------------------------------------------------------------------------- cost

# Tensors of optimizer state per trained parameter tensor, each its size (momentum for the
# SGD family, exp_avg and exp_avg_sq for AdamW); SGD-SaI's per-tensor scalars are negligible.
STATE_BUFFERS = {"sgd-sai": 1, "sgd": 1, "scaled-sgd": 1, "adamw": 2, "scaled-adamw": 2}


@dataclass
class RunCost:
    steps_logged: int
    median_step_time: float | None  # seconds
    peak_mem_mb: float | None
    state_bytes: int | None
    # "logged" (metrics.jsonl), "checkpoint" (measured), "estimate" (from the LoRA size), or ""
    state_source: str


def run_cost(run_dir: Path, *, optimizer: str | None = None, momentum: float = 0.9) -> RunCost:
    """Median step time and peak memory from ``metrics.jsonl``; optimizer state bytes as logged
    there, else measured in the latest checkpoint's ``optimizer.pt``, else estimated from
    ``lora.safetensors`` and ``STATE_BUFFERS`` when ``optimizer`` is given."""
    records = read_metrics(run_dir)
    times = [r["step_time"] for r in records if isinstance(r.get("step_time"), int | float)]
    mems = [r["peak_mem_mb"] for r in records if isinstance(r.get("peak_mem_mb"), int | float)]
    logged = next(
        (
            r[k]
            for r in reversed(records)
            for k in ("optimizer_state_bytes", "state_bytes")
            if k in r
        ),
        None,
    )
    if isinstance(logged, int):
        state, source = logged, "logged"
    elif (state := checkpoint_state_bytes(run_dir)) is not None:
        source = "checkpoint"
    elif optimizer in STATE_BUFFERS and (numel := lora_numel(run_dir)):
        buffers = STATE_BUFFERS[optimizer] if momentum > 0 or "adam" in optimizer else 0
        state, source = buffers * numel * 4, "estimate"  # fp32 buffers
    else:
        state, source = None, ""
    return RunCost(
        steps_logged=len(records),
        median_step_time=statistics.median(times) if times else None,
        peak_mem_mb=max(mems) if mems else None,
        state_bytes=state,
        state_source=source,
    )


def checkpoint_state_bytes(run_dir: Path) -> int | None:
    """Bytes of the tensors in the newest checkpoint's optimizer state (each tensor once)."""
    import torch

    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("step-*/optimizer.pt"))
    if not checkpoints:
        return None
    try:
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["state"]
    except Exception:  # noqa: BLE001 - a torn or foreign file: no measurement, not a crash
        return None
    seen, total = set(), 0
    for per_param in state.values():
        for value in per_param.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def lora_numel(run_dir: Path) -> int:
    """Number of trained LoRA weights in ``lora.safetensors`` (0 when absent)."""
    from safetensors import safe_open

    path = Path(run_dir) / "lora.safetensors"
    if not path.is_file():
        return 0
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            shape = f.get_slice(key).get_shape()
            n = 1
            for dim in shape:
                n *= dim
            total += n
    return total


def format_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
