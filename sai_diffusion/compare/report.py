"""The HTML report beside a comparison grid: each run's settings and scores, the sampling
settings, and the image."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..files.run_dir import RunInfo
from ..fsutil import atomic_path, atomic_write_text
from .grid import stack


def write_report(
    out_png: Path,
    grids: Mapping[str, Image.Image],
    runs: Sequence[RunInfo],
    settings: Mapping[str, Any],
) -> Path:
    """Write ``out_png`` (the grids of ``{prompt: grid}`` stacked in order) and, beside it,
    the HTML report (same name, ``.html``): the image, the sampling ``settings``, and each
    run's settings and eval.json scores. Both files are written atomically. Returns the HTML
    path."""
    out_png = Path(out_png)
    html_path = out_png.with_suffix(".html")
    image = stack(list(grids.values()))
    with atomic_path(out_png) as tmp:
        image.save(tmp, format="PNG")
    atomic_write_text(html_path, report_html(out_png.name, list(grids), runs, settings))
    return html_path


def report_html(
    image_src: str, prompts: Sequence[str], runs: Sequence[RunInfo], settings: Mapping[str, Any]
) -> str:
    esc = html.escape
    score_keys = sorted(  # sai-eval's headline numbers; its per-prompt detail stays in the file
        {k for r in runs for k, v in (r.scores or {}).items() if isinstance(v, int | float)}
    )
    head = ["run", "concept", "token", "optimizer", "lr", "steps", "rank", "alpha",
            "base model", "base model hash", *score_keys]  # fmt: skip
    body = []
    for r in runs:
        cells = [
            f'<span title="{esc(str(r.path))}">{esc(r.name)}</span>',
            esc(r.concept),
            f"<code>{esc(r.token)}</code>",
            esc(r.optimizer),
            f"{r.lr:g}",
            str(r.steps),
            str(r.rank),
            f"{r.alpha:g}",
            esc(str(r.base_model)),
            f"<code>{esc(str(r.base_model_hash))}</code>",
            *(_score_cell((r.scores or {}).get(k)) for k in score_keys),
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    setting_rows = [
        f"<tr><th>{esc(str(k))}</th><td>{_setting_cell(v)}</td></tr>"
        for k, v in {"prompts": list(prompts), **settings}.items()
    ]
    title = f"sai-compare: {len(runs)} run{'s' * (len(runs) != 1)}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<h2>Runs</h2>
<table>
<tr>{"".join(f"<th>{esc(h)}</th>" for h in head)}</tr>
{chr(10).join(body)}
</table>
<h2>Sampling</h2>
<table>
{chr(10).join(setting_rows)}
</table>
<h2>Images</h2>
<p>One row per run, one column per seed, one block per prompt.</p>
<img src="{esc(image_src)}" alt="comparison grid">
</body>
</html>
"""


def _score_cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int | str | bool):
        return html.escape(str(value))
    return f"<code>{html.escape(json.dumps(value))}</code>"


def _setting_cell(value: Any) -> str:
    if isinstance(value, list | tuple):  # prompts one per line: they hold commas themselves
        sep = ", " if all(isinstance(v, int | float) for v in value) else "<br>"
        return sep.join(html.escape(str(v)) for v in value)
    return "<i>none</i>" if value is None else html.escape(str(value))
