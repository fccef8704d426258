"""Side by side: several runs on one base model, same prompts, seeds, sampler and settings.

    runs = [load_run_info(d) for d in run_dirs]          # or find_runs(Path("runs"))
    comparer = Comparer(runs)                            # base model once, one adapter per run
    shown = comparer.compare("a pencil sketch of {token}", [1, 2, 3], with_base=True)
    shown.grid.save("grid.png")                          # one row per run, one column per seed

The runs are loaded by ``models.inference.RunModels`` (weight 0 gives the base UNet exactly).
The "base" row turns LoRA off and reads ``{token}`` (and any run's token) as the concept's
class word: the base model has never seen the token.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..files.run_dir import RunInfo
from ..models.inference import RunModels
from ..models.sampling import SampleSettings, generate
from .grid import make_grid
from .labels import BASE_ROW, row_labels

SEED_LIMIT = 2**63  # a signed 64-bit integer: what torch's generators and numpy both take


@dataclass
class Comparison:
    """One prompt, every run's images with the same seeds, and the labelled grid of them."""

    prompt: str
    seeds: list[int]
    rows: dict[str, list[Image.Image]]  # run name (or BASE_ROW) -> one image per seed
    labels: dict[str, str]  # the rows' labels (newlines allowed)
    grid: Image.Image
    title: str = ""  # the grid's heading: the prompt as the runs read it (``shown_prompt``)

    def items(self) -> list[tuple[Image.Image, str]]:
        """Every image with a one-line caption: ``sgd-sai · lr 0.1 · 500 steps · seed 2``."""
        return [
            (image, f"{self.labels.get(name, name).replace(chr(10), ' · ')} · seed {seed}")
            for name, images in self.rows.items()
            for seed, image in zip(self.seeds, images, strict=True)
        ]


class Comparer:
    """Every run drawn side by side: ``models.inference.RunModels`` (one base model, one
    adapter per run) with the same seeds, sampler and settings for every row.

    ``comparer.runs`` are the given runs, in order, under names of their own (a folder name
    that repeats another's, or is "base", becomes ``parent/name``); those names key the images.
    ``active`` and ``pipe`` are the models' (threads may share one comparer).

    Raises:
        UserError: no runs, an unfinished run, a run given twice, runs on different base
            models, or files that do not load.
    """

    def __init__(self, runs: Sequence[RunInfo], *, device: str | torch.device | None = None):
        self.models = RunModels(runs, device=device)
        self.runs, self.pipe, self.device = self.models.runs, self.models.pipe, self.models.device

    def active(self, run_name: str | None, lora_weight: float = 1.0):
        """``RunModels.active``: the pipeline with one run switched on (None: the base)."""
        return self.models.active(run_name, lora_weight)

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
            UserError: no seeds, a seed that is not a whole number in [0, 2**63), or steps,
                size or guidance out of range.
        """
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
                out.append(generate(self.pipe, text, seed, settings))
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

    def compare(
        self,
        prompt: str,
        seeds: list[int],
        *,
        title: str | None = None,
        order: Sequence[Path] | None = None,
        **settings,
    ) -> Comparison:
        """``generate`` (same ``settings``), then the labelled grid: one row per run (in
        ``order``, run folders, when given; else ``self.runs``' order), then the base row, one
        column per seed, under ``title`` (default: the prompt), ``{token}`` shown as the runs'
        token (``shown_prompt``)."""
        rows = self.generate(prompt, seeds, **settings)
        if order is not None:
            name_of = {r.path: r.name for r in self.runs}
            names = [name_of[Path(path)] for path in order]
            rows = {n: rows[n] for n in [*names, *(k for k in rows if k not in names)]}
        labels = row_labels(self.runs, with_base=BASE_ROW in rows)
        columns = [f"seed {s}" for s in seeds]
        heading = self.shown_prompt(title or prompt)
        grid = make_grid(rows, row_labels=labels, col_labels=columns, title=heading)
        return Comparison(prompt, list(seeds), rows, labels, grid, heading)

    def shown_prompt(self, text: str) -> str:
        """``text`` as the runs' rows read it: ``{token}`` as their token ("<a> / <b>" when
        they differ), so that a grid's heading is the prompt the images were drawn from."""
        tokens = dict.fromkeys(run.token for run in self.runs)  # in order, once each
        return text.replace("{token}", " / ".join(tokens))

    def base_prompt(self, prompt: str) -> str:
        """The prompt of the base row: ``{token}`` and every run's token read as the class word
        (of the first run for ``{token}``)."""
        text = prompt.replace("{token}", self.runs[0].class_word or self.runs[0].token)
        for run in self.runs:
            text = text.replace(run.token, run.class_word or run.token)
        return text


def check_seeds(seeds: Sequence[int]) -> None:
    """Raises UserError: no seeds, or one that is not a whole number in [0, 2**63)."""
    if not seeds:
        raise UserError("No seeds given: pass at least one, e.g. --seeds 1 2 3.")
    for seed in seeds:
        whole = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
        if not whole or not 0 <= seed < SEED_LIMIT:
            shown = str(seed) if len(str(seed)) <= 30 else str(seed)[:30] + "…"
            raise UserError(f"seed {shown}: a seed is a whole number from 0 to 2**63 - 1.")


def _check_settings(seeds: list[int], *, steps: int, guidance: float, size: int) -> None:
    check_seeds(seeds)
    if not 1 <= steps <= 1000:
        raise UserError(f"steps must be in [1, 1000], got {steps}.")
    if not 0 <= guidance <= 50:
        raise UserError(f"guidance must be in [0, 50], got {guidance}.")
    if size < 8 or size > 4096 or size % 8:
        raise UserError(
            f"resolution must be a multiple of 8 in [8, 4096], got {size}; SD 1.5 models "
            "are usually sampled at 512."
        )
