"""How runs are named where people pick and compare them: the picker's labels and groups, and
the grid's row labels. Two runs must never read the same."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..files.run_dir import RunInfo
from ..models.inference import BASE_NAME

BASE_ROW = BASE_NAME  # key of the grid row without LoRA


def distinct(labels: Mapping[str, str], sep: str) -> dict[str, str]:
    """``labels`` (key -> text) where every text that appears twice gets its key appended
    after ``sep``, so that no two read the same."""
    seen = Counter(labels.values())
    return {key: f"{text}{sep}{key}" if seen[text] > 1 else text for key, text in labels.items()}


def short_label(info: RunInfo) -> str:
    """``sgd-sai, lr 0.05, 500 steps`` (``, ED-LoRA`` for layer-wise embeddings)."""
    label = f"{info.optimizer}, lr {info.lr:g}, {info.steps} steps"
    return f"{label}, ED-LoRA" if info.edlora else label


def row_labels(runs: Sequence[RunInfo], *, with_base: bool = False) -> dict[str, str]:
    """Grid row labels by run name: optimizer, lr, steps on three lines; the concept above
    them when the runs mix concepts, the run name below when two would read the same."""
    mixed = len({r.concept for r in runs}) > 1
    labels = {r.name: "\n".join(short_label(r).split(", ")) for r in runs}
    if mixed:
        labels = {r.name: f"{r.concept}\n{labels[r.name]}" for r in runs}
    labels = distinct(labels, "\n")
    if with_base:
        labels[BASE_ROW] = "base model\n(no LoRA)"
    return labels


def run_label(info: RunInfo) -> str:
    """``potter · sgd-sai lr=0.1 · 1750 steps`` (``· unfinished`` when it has no LoRA yet)."""
    label = f"{info.concept} · {info.optimizer} lr={info.lr:g} · {info.steps} steps"
    label += " · ED-LoRA" if info.edlora else ""
    return label if info.has_lora else f"{label} · unfinished"


def run_labels(index: Mapping[str, RunInfo]) -> dict[str, str]:
    """``run_label`` for every run of an index (``files.run_dir.index_runs``)."""
    return distinct({key: run_label(info) for key, info in index.items()}, " · ")


def group_runs(index: Mapping[str, RunInfo]) -> dict[str, list[str]]:
    """Run keys grouped by concept and base model, under labels like ``potter · on
    chilloutmix.safetensors`` (with a short hash where two bases share a file name)."""
    identities: dict[str, set[str]] = {}
    for info in index.values():
        identities.setdefault(_base_name(info), set()).add(info.base_identity)
    groups: dict[str, list[str]] = {}
    for key, info in sorted(index.items(), key=lambda kv: (kv[1].concept, _base_name(kv[1]))):
        base = _base_name(info)
        if len(identities[base]) > 1:
            base += f" ({info.base_identity.split(':')[-1][:8]})"
        groups.setdefault(f"{info.concept} · on {base}", []).append(key)
    return groups


def _base_name(info: RunInfo) -> str:
    return Path(str(info.base_model)).name if info.base_model else "unknown base"
