"""How runs trained, as the app shows them: each run's loss curve, SGD-SaI's lr scale per UNet
block, and what a step cost (time, memory, optimizer state).

Read-only views over a run folder (``files.run_dir``). A run may still be training, so a missing
file or a torn last line gives an empty view, never an exception.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files.lora_files import lora_numel
from ..files.run_dir import RunDir
from ..optim import STATE_BUFFERS, state_bytes


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
    # the held-out images' loss (validation_split / validation_data), where it was computed
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def loss_curve(run_dir: Path, *, smoothing: float = 0.9) -> LossCurve:
    """Loss against step, raw and EMA-smoothed, and the validation loss (not smoothed: its
    draws are fixed); empty lists before the first logged step."""
    records = RunDir(run_dir).read_metrics()
    train = [r for r in records if _is_number(r.get("loss"))]
    val = [r for r in records if _is_number(r.get("val_loss"))]
    losses = [float(r["loss"]) for r in train]
    return LossCurve(
        [r["step"] for r in train],
        losses,
        ema(losses, smoothing),
        [r["step"] for r in val],
        [float(r["val_loss"]) for r in val],
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -------------------------------------------------------------------------------- g-SNR


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
@dataclass
class RunCost:
    steps_logged: int
    median_step_time: float | None  # seconds
    median_data_wait: float | None  # seconds a step waited for its inputs (None: not recorded)
    peak_mem_mb: float | None
    state_bytes: int | None
    state_source: str  # "checkpoint" (measured), "estimate" (from the LoRA size), or ""


def run_cost(run_dir: Path, *, optimizer: str | None = None, momentum: float = 0.9) -> RunCost:
    """Median step time and data wait, and peak memory, from ``metrics.jsonl``; optimizer state bytes measured
    in the latest checkpoint's ``optimizer.pt``, else estimated from ``lora.safetensors`` and
    ``optim.STATE_BUFFERS`` when ``optimizer`` is given."""
    records = RunDir(run_dir).read_metrics()
    times = [r["step_time"] for r in records if isinstance(r.get("step_time"), int | float)]
    waits = [r["data_wait"] for r in records if isinstance(r.get("data_wait"), int | float)]
    mems = [r["peak_mem_mb"] for r in records if isinstance(r.get("peak_mem_mb"), int | float)]
    if (state := checkpoint_state_bytes(run_dir)) is not None:
        source = "checkpoint"
    elif optimizer in STATE_BUFFERS and (numel := lora_numel(run_dir)):
        buffers = STATE_BUFFERS[optimizer] if momentum > 0 or "adam" in optimizer else 0
        state, source = buffers * numel * 4, "estimate"  # fp32 buffers
    else:
        state, source = None, ""
    return RunCost(
        steps_logged=len(records),
        median_step_time=statistics.median(times) if times else None,
        median_data_wait=statistics.median(waits) if waits else None,
        peak_mem_mb=max(mems) if mems else None,
        state_bytes=state,
        state_source=source,
    )


def checkpoint_state_bytes(run_dir: Path) -> int | None:
    """Bytes of the tensors in the newest checkpoint's optimizer state (each tensor once)."""
    folders = [c for c in RunDir(run_dir).checkpoint_folders() if c.optimizer.is_file()]
    if not folders:
        return None
    try:
        saved = torch.load(folders[-1].optimizer, map_location="cpu", weights_only=True)
        return state_bytes(saved["state"])
    except Exception:  # noqa: BLE001 - a torn or foreign file: no measurement, not a crash
        return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
