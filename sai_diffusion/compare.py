"""Side by side: several runs on one base model, same prompts, seeds, sampler and settings.

    runs = [load_run_info(d) for d in run_dirs]        # or find_runs(Path("runs"))
    comparer = Comparer(runs)                          # base model once, one adapter per run
    images = comparer.generate("a pencil sketch of {token}", [1, 2, 3], with_base=True)
    grid = make_grid(images, row_labels=row_labels(comparer.runs, with_base=True),
                     col_labels=["seed 1", "seed 2", "seed 3"], title="a pencil sketch of {token}")
    write_report(Path("grid.png"), {"a pencil sketch of {token}": grid}, comparer.runs, settings)

The base model is loaded once; each run's LoRA becomes its own peft adapter and is switched
on with ``set_adapters`` (weight 0 gives the base UNet exactly). Runs of one concept share
the token name, so the token is added once and its row is overwritten with each run's vector
before that run's images. The "base" row turns LoRA off and reads ``{token}`` (and any run's
token) as the concept's class word: the base model has never seen the token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import UserError
from .fsutil import atomic_path, atomic_write_text
from .grid import GridLayout, grid_layout, make_grid, stack
from .lora_io import LORA_FILE

__all__ = [
    "BASE_ROW", "Comparer", "GridLayout", "RunInfo", "find_runs", "grid_layout",
    "load_run_info", "make_grid", "row_labels", "write_report",
]  # fmt: skip

BASE_ROW = "base"  # key and label of the row without LoRA
EVAL_FILE = "eval.json"
SCHEDULER = "DPM-Solver++ multistep"  # sample.sampling_pipeline's


# ------------------------------------------------------------------------------- run folders
@dataclass
class RunInfo:
    """What a comparison shows about one run folder (from run.yaml, the LoRA header, eval.json)."""

    path: Path
    name: str  # the folder name; also the key of the run's images
    concept: str
    token: str
    optimizer: str
    lr: float
    steps: int  # steps trained (the LoRA's header), or logged so far when unfinished
    rank: int
    alpha: float
    base_model: str | None
    base_model_hash: str | None
    resolution: int
    validation_prompts: list[str]  # with the token filled in
    scores: dict[str, Any] | None  # eval.json, when sai-eval has scored the run
    has_lora: bool  # False: an unfinished run
    class_word: str = ""

    @property
    def label(self) -> str:
        """``sgd-sai, lr 0.05, 500 steps``."""
        return f"{self.optimizer}, lr {self.lr:g}, {self.steps} steps"


def load_run_info(run_dir: Path) -> RunInfo:
    """Read a folder written by ``sai-train-lora``.

    Raises:
        UserError: the folder has no run.yaml or an unreadable one.
    """
    from .config import load_run_yaml

    run_dir = Path(run_dir).expanduser().resolve()
    cfg, concept, data = load_run_yaml(run_dir)
    lr = data.get("lr")
    return RunInfo(
        path=run_dir,
        name=run_dir.name,
        concept=concept.name,
        token=concept.token,
        optimizer=cfg.optimizer,
        lr=float(lr) if isinstance(lr, int | float) else cfg.resolved_lr(concept),
        steps=_trained_steps(run_dir),
        rank=cfg.rank,
        alpha=cfg.alpha,
        base_model=cfg.base_model,
        base_model_hash=data.get("base_model_hash"),
        resolution=cfg.resolution,
        validation_prompts=concept.prompts(),
        scores=_read_scores(run_dir / EVAL_FILE),
        has_lora=(run_dir / LORA_FILE).is_file(),
        class_word=concept.class_word,
    )


def find_runs(root: Path) -> list[RunInfo]:
    """Every run folder under ``root`` (itself included), sorted by path.

    Unfinished runs are listed with ``has_lora`` False; folders whose run.yaml does not parse
    are left out. A run's own subfolders (checkpoints, samples) are not searched.
    """
    runs = []
    for folder, subdirs, files in os.walk(Path(root).expanduser()):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .tmp: atomic writes
        if "run.yaml" not in files:
            continue
        subdirs[:] = []
        try:
            runs.append(load_run_info(Path(folder)))
        except Exception:  # anything unreadable is not a run to offer
            continue
    return sorted(runs, key=lambda r: str(r.path))


def _trained_steps(run_dir: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / LORA_FILE), framework="pt") as f:
            return int((f.metadata() or {})["max_train_steps"])
    except Exception:  # no LoRA yet (or an odd one): count the logged steps instead
        pass
    steps = 0
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                steps = max(steps, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
    return steps


def _read_scores(path: Path) -> dict[str, Any] | None:
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return scores if isinstance(scores, dict) else None


def row_labels(runs: Sequence[RunInfo], *, with_base: bool = False) -> dict[str, str]:
    """Grid row labels: optimizer, lr, steps; plus the concept when the runs mix concepts, and
    the run name when two labels would otherwise read the same."""
    mixed = len({r.concept for r in runs}) > 1
    labels = {r.name: "\n".join(r.label.split(", ")) for r in runs}
    if mixed:
        labels = {r.name: f"{r.concept}\n{labels[r.name]}" for r in runs}
    repeated = Counter(labels.values())
    labels = {k: f"{v}\n{k}" if repeated[v] > 1 else v for k, v in labels.items()}
    if with_base:
        labels[BASE_ROW] = "base model\n(no LoRA)"
    return labels


# ------------------------------------------------------------------------------- generation
class Comparer:
    """One base model with every run's LoRA loaded as its own adapter.

    ``comparer.runs`` are the given runs, in order; a run whose folder name repeats another's
    (or is "base") is renamed ``parent/name`` there, and that name keys its images.
    ``generate`` holds a lock: the pipeline's active adapter and token rows are shared state.

    Raises:
        UserError: no runs, an unfinished run, a run given twice, runs on different base
            models, or files that do not load.
    """

    def __init__(self, runs: Sequence[RunInfo], *, device: str | torch.device | None = None):
        from .config import load_run_yaml
        from .lora_io import read_embeddings, set_token_embeddings
        from .models import load_base_model
        from .sample import sampling_pipeline

        self.runs = _checked_runs(runs)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._lock = threading.Lock()
        # Files first: a bad one should fail before the model loads.
        self._vectors = {r.name: read_embeddings(r.path) for r in self.runs}

        source = _base_source(self.runs)
        cfg, _, _ = load_run_yaml(source.path)
        base = load_base_model(
            cfg.base_model,
            base_config=Path(cfg.base_config) if cfg.base_config else None,
            allow_pickle=cfg.allow_pickle,
        )
        self.pipe = sampling_pipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.unet,
            scheduler_config=base.scheduler.config,
        )
        # Tokens before adapters: resizing the embedding table must not meet peft wrappers.
        for vectors in self._vectors.values():
            set_token_embeddings(self.pipe, vectors)
        self._adapters = _adapter_names(self.runs)
        for run in self.runs:
            self._load_lora(run)
        self.pipe.to(self.device)

    def _load_lora(self, run: RunInfo) -> None:
        # Several adapters per model are the point here, and a run without text-encoder LoRA
        # is normal: silence the warnings diffusers and peft give for both.
        lora_log = logging.getLogger("diffusers.loaders.lora_base")
        level = lora_log.level
        lora_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(
                    run.path, weight_name=LORA_FILE, adapter_name=self._adapters[run.name]
                )
        except Exception as e:  # diffusers/peft raise ValueError, KeyError, OSError, ...
            raise UserError(
                f"Could not load {run.path / LORA_FILE} onto the base model {run.base_model}: "
                f"{_first_line(e)}. Is it a finished sai-train-lora run of this base model?"
            ) from e
        finally:
            lora_log.setLevel(level)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        seeds: list[int],
        *,
        steps: int = 25,
        guidance: float = 7.5,
        negative_prompt: str | None = None,
        lora_weight: float = 1.0,
        resolution: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        with_base: bool = False,
    ) -> dict[str, list[Image.Image]]:
        """One image per (run, seed), keyed by run name in ``self.runs`` order, then "base".

        ``{token}`` in ``prompt`` becomes each run's token. Every row uses the same seeds,
        sampler, steps, guidance, negative prompt and size (default: the first run's training
        resolution). ``progress(done, total)`` is called after each image.

        Raises:
            UserError: no seeds, or steps, size or guidance out of range.
        """
        from .sample import SampleSettings
        from .sample import generate as sample_one

        size = resolution if resolution is not None else self.runs[0].resolution
        _check_settings(seeds, steps=steps, guidance=guidance, size=size)
        settings = SampleSettings(
            steps=steps,
            guidance_scale=guidance,
            negative_prompt=negative_prompt,
            height=size,
            width=size,
        )
        total = len(seeds) * (len(self.runs) + int(with_base))
        done = 0

        def images(text: str) -> list[Image.Image]:
            nonlocal done
            out = []
            for seed in seeds:
                out.append(sample_one(self.pipe, text, seed, settings))
                done += 1
                if progress is not None:
                    progress(done, total)
            return out

        rows: dict[str, list[Image.Image]] = {}
        for run in self.runs:
            with self.active(run.name, lora_weight):
                rows[run.name] = images(prompt.replace("{token}", run.token))
        if with_base:
            with self.active(None):
                rows[BASE_ROW] = images(self.base_prompt(prompt))
        return rows

    @contextlib.contextmanager
    def active(self, run_name: str | None, lora_weight: float = 1.0):
        """Hold the pipeline with run ``run_name``'s LoRA (at ``lora_weight``) and token
        vectors switched on, or with LoRA off for None (the base model)."""
        from .lora_io import set_token_embeddings

        with self._lock:
            if run_name is None:
                self.pipe.disable_lora()
                try:
                    yield self.pipe
                finally:
                    self.pipe.enable_lora()
                return
            set_token_embeddings(self.pipe, self._vectors[run_name])
            self.pipe.set_adapters([self._adapters[run_name]], adapter_weights=[lora_weight])
            yield self.pipe

    def base_prompt(self, prompt: str) -> str:
        """The prompt of the base row: ``{token}`` and every run's token read as the class word
        (of the first run for ``{token}``)."""
        text = prompt.replace("{token}", self.runs[0].class_word or self.runs[0].token)
        for run in self.runs:
            text = text.replace(run.token, run.class_word or run.token)
        return text


def _checked_runs(runs: Sequence[RunInfo]) -> list[RunInfo]:
    if not runs:
        raise UserError("No runs to compare: pass one or more run folders of sai-train-lora.")
    paths = Counter(r.path for r in runs)
    twice = [str(p) for p, n in paths.items() if n > 1]
    if twice:
        raise UserError(f"Run {twice[0]} is given twice; give each run folder once.")
    unfinished = [r for r in runs if not r.has_lora]
    if unfinished:
        r = unfinished[0]
        raise UserError(
            f"{r.path} has no {LORA_FILE}: the run has not finished. Resume it with "
            f"`sai-train-lora --resume {r.path}`, or leave it out of the comparison."
        )
    first = runs[0]
    for run in runs[1:]:
        if _base_identity(run) != _base_identity(first):
            raise UserError(
                f"Runs on different base models cannot be compared: {first.name} was trained "
                f"on {first.base_model} ({first.base_model_hash}), {run.name} on "
                f"{run.base_model} ({run.base_model_hash}). A LoRA only means something on its "
                "own base model; compare the runs of each base model separately."
            )
    names = Counter(r.name for r in runs)
    out, taken = [], set()
    for run in runs:
        name = run.name
        if names[name] > 1 or name == BASE_ROW:
            name = f"{run.path.parent.name}/{run.name}"
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name} ({k})", k + 1
        taken.add(unique)
        out.append(dataclasses.replace(run, name=unique))
    return out


def _base_identity(run: RunInfo) -> str:
    # The hash names the weights wherever they lie; runs without one fall back to the path.
    return run.base_model_hash or f"path:{run.base_model}"


def _base_source(runs: list[RunInfo]) -> RunInfo:
    """The first run whose base model is still where it was (runs may name copies of one
    model); else the first run, whose loader error then names the missing path."""
    for run in runs:
        if run.base_model and Path(run.base_model).expanduser().exists():
            return run
    return runs[0]


def _adapter_names(runs: list[RunInfo]) -> dict[str, str]:
    """peft adapter names from the folder names: letters, digits and _ only (peft keeps them
    as module keys, where "." is not allowed), numbered so that they never repeat."""
    return {r.name: f"r{i}_" + re.sub(r"\W", "_", r.name) for i, r in enumerate(runs)}


def _check_settings(seeds: list[int], *, steps: int, guidance: float, size: int) -> None:
    if not seeds:
        raise UserError("No seeds given: pass at least one, e.g. --seeds 1 2 3.")
    if not 1 <= steps <= 1000:
        raise UserError(f"steps must be in [1, 1000], got {steps}.")
    if not 0 <= guidance <= 50:
        raise UserError(f"guidance must be in [0, 50], got {guidance}.")
    if size < 8 or size > 4096 or size % 8:
        raise UserError(
            f"resolution must be a multiple of 8 in [8, 4096], got {size}; SD 1.5 models "
            "are usually sampled at 512."
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(".")


# ------------------------------------------------------------------------------------ report
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
