"""The Training tab's views of the chosen runs: loss curves, SGD-SaI's per-block scales, a
table of costs and scores, and the validation samples. Drawing only; the numbers come from
``sai_diffusion.compare.views`` and the run folders (``sai_diffusion.files.run_dir``)."""

from __future__ import annotations

from typing import Any

import gradio as gr
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from sai_diffusion.compare import views
from sai_diffusion.files.run_dir import RunInfo, read_samples


def loss_figure(
    index: dict[str, RunInfo], keys: list[str], labels: dict[str, str], smoothing: float
) -> Figure | None:
    """The runs' losses against step, raw (faint) and EMA-smoothed, one colour per run, and
    each run's validation loss on its held-out images (dashed) when it has one."""
    if not keys:
        return None
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.add_subplot()
    held_out = False
    for i, key in enumerate(keys):
        curve = views.loss_curve(index[key].path, smoothing=smoothing)
        color = f"C{i % 10}"
        ax.plot(curve.steps, curve.loss, color=color, alpha=0.25, linewidth=0.8)
        marker = "o" if len(curve.steps) <= 40 else None  # a short run is a few points
        ax.plot(
            curve.steps,
            curve.smoothed,
            color=color,
            linewidth=1.8,
            marker=marker,
            markersize=3,
            label=labels[key],
        )
        if curve.val_steps:
            ax.plot(curve.val_steps, curve.val_loss, color=color, linestyle="--", marker="s",
                    markersize=3, linewidth=1.2, label=f"{labels[key]}, held out")  # fmt: skip
            held_out = True
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    title = f"Training loss (faint: raw; solid: EMA, smoothing {smoothing:g}"
    title += "; dashed: held-out images)" if held_out else ")"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


_FACTORS = {"A": ("LoRA A (down)", "C0"), "B": ("LoRA B (up)", "C1"), "": ("other", "C2")}


def gsnr_figure(
    index: dict[str, RunInfo], keys: list[str], labels: dict[str, str]
) -> Figure | None:
    """SGD-SaI's lr scale per block, as the paper's Fig. 3: one bar per UNet block, attention
    and projection (LoRA A and B side by side), whiskers from the smallest to the largest
    tensor of the block. None when no chosen run has a gsnr.json."""
    panels = []
    for key in keys:
        groups, missing = views.gsnr_by_block(index[key].files.read_gsnr())
        if groups:
            panels.append((key, groups, missing))
    if not panels:
        return None
    slots_per_panel = max(
        len({(g.key.block, g.key.attn, g.key.proj) for g in p[1]}) for p in panels
    )
    fig = Figure(
        figsize=(max(9, 0.24 * slots_per_panel + 2), 3.4 * len(panels)), layout="constrained"
    )
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (key, groups, missing) in zip(axes, panels, strict=True):
        slots, x, spans = [], {}, {}
        pos = 0.0
        for g in groups:
            slot = (g.key.block, g.key.attn, g.key.proj)
            if slot in x:
                continue
            if slots and slot[0] != slots[-1][0]:
                pos += 0.8  # a gap between UNet blocks
            slots.append(slot)
            x[slot] = pos
            spans.setdefault(slot[0], []).append(pos)
            pos += 1
        factors = {g.key.factor for g in groups}
        width = 0.4 if len(factors) > 1 else 0.8
        for n, factor in enumerate(f for f in ("A", "B", "") if f in factors):
            sel = [g for g in groups if g.key.factor == factor]
            shift = (n - (len(factors) - 1) / 2) * width
            name, color = _FACTORS[factor]
            ax.bar(
                [x[(g.key.block, g.key.attn, g.key.proj)] + shift for g in sel],
                [g.mean for g in sel],
                width=width,
                color=color,
                label=name,
                yerr=[[g.mean - g.low for g in sel], [g.high - g.mean for g in sel]],
                error_kw={"elinewidth": 0.6, "capsize": 1.5},
            )
        ax.set_xticks(
            [x[s] for s in slots], [".".join(p for p in s[1:] if p) or s[0] for s in slots]
        )
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for block, xs in spans.items():
            ax.text(
                sum(xs) / len(xs), 1.01, block, transform=top, ha="center", va="bottom", fontsize=7
            )
        ax.set_yscale("log")
        ax.set_ylabel("lr scale (g-SNR / max)")
        ax.grid(axis="y", alpha=0.3)
        note = f"; {missing} tensor(s) never got a gradient" if missing else ""
        ax.set_title(f"{labels[key]}: SGD-SaI scale per block{note}", fontsize=10, pad=16)
        ax.legend(fontsize=7, loc="lower right")
    return fig


COST_HEADERS = [
    "run",
    "rank / alpha",
    "median step (s)",
    "waiting for data (s)",
    "peak memory (MiB)",
    "optimizer state",
    "final loss (EMA 0.9)",
]

# sai-eval's figures (eval.json) in words people read; others shown with spaces for "_"
SCORE_NAMES = {
    "concept_fidelity": "concept fidelity",
    "prompt_fidelity": "prompt fidelity",
    "clip_t": "text alignment (CLIP-T)",
    "clip_t_mos": "CLIP-T, Mix-of-Show scale",
    "clip_i": "image alignment (CLIP-I)",
    "dino": "image alignment (DINO)",
}


def score_name(key: str) -> str:
    if key.startswith("base_"):
        return f"base model: {score_name(key[5:])}"
    return SCORE_NAMES.get(key, key.replace("_", " "))


def alignment_figure(
    index: dict[str, RunInfo], keys: list[str], labels: dict[str, str]
) -> Figure | None:
    """The trade-off of the field: image alignment (CLIP-I) against text alignment (CLIP-T),
    one point per scored run, labelled by optimizer and lr; the base model's point, where
    scored, in grey. None when no chosen run has CLIP figures in its eval.json."""
    points = [(k, index[k].scores) for k in keys if "clip_i" in (index[k].scores or {})]
    if not points:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (key, scores) in enumerate(points):
        info = index[key]
        ax.scatter(scores["clip_t"], scores["clip_i"], color=f"C{i % 10}", s=40, zorder=3)
        ax.annotate(f"{info.optimizer}, lr {info.lr:g}", (scores["clip_t"], scores["clip_i"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)  # fmt: skip
        if "base_clip_i" in scores:
            ax.scatter(scores["base_clip_t"], scores["base_clip_i"], color="0.6", marker="x")
    if any("base_clip_i" in s for _, s in points):
        ax.scatter([], [], color="0.6", marker="x", label="base model (class word)")
        ax.legend(fontsize=8)
    ax.set_xlabel("text alignment (CLIP-T): follows the prompt")
    ax.set_ylabel("image alignment (CLIP-I): looks like the concept")
    ax.set_title("Concept against prompt: up and right is better", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def cost_table(index: dict[str, RunInfo], keys: list[str], labels: dict[str, str]):
    """One row per run (its label names optimizer, lr and steps): median step time, peak
    memory, optimizer state (measured in the last checkpoint, or estimated), smoothed final
    loss, and every sai-eval score."""
    scores = {  # sai-eval's headline figures; its settings and per-prompt detail stay in the file
        k: {n: v for n, v in (index[k].scores or {}).items() if _is_number(v)} for k in keys
    }
    score_keys = sorted({s for flat in scores.values() for s in flat})
    rows = []
    for key in keys:
        info = index[key]
        cost = views.run_cost(info.path, optimizer=info.optimizer)
        curve = views.loss_curve(info.path, smoothing=0.9)
        state = views.format_bytes(cost.state_bytes)
        if cost.state_source == "estimate":
            state += " (est.)"
        rows.append(
            [
                labels[key],
                f"{info.rank} / {info.alpha:g}",
                _num(cost.median_step_time, ".3f"),
                _num(cost.median_data_wait, ".3f"),
                _num(cost.peak_mem_mb, ".0f"),
                state,
                _num(curve.smoothed[-1] if curve.smoothed else None, ".4f"),
                *(_num(scores[key].get(s), ".4g") for s in score_keys),
            ]
        )
    return gr.Dataframe(value=rows, headers=COST_HEADERS + [score_name(s) for s in score_keys])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def sample_gallery(index: dict[str, RunInfo], keys: list[str], labels: dict[str, str]):
    """The validation images each run wrote when it finished (samples/final)."""
    return [
        (str(sample.path), f"{labels[key]} · {sample.prompt} · seed {_or_unknown(sample.seed)}")
        for key in keys
        for sample in read_samples(index[key].files.samples())
    ]


def _or_unknown(value: Any) -> str:
    return "?" if value is None else str(value)
