"""Side by side: several runs on one base model, same prompts, seeds, sampler and settings.

    runs = [load_run_info(d) for d in run_dirs]          # or find_runs(Path("runs"))
    comparer = Comparer(runs)                            # base model once, one adapter per run
    shown = comparer.compare("a pencil sketch of {token}", [1, 2, 3], with_base=True)
    shown.grid.save("grid.png")                          # one row per run, one column per seed

The base model is loaded once; each run's LoRA becomes its own peft adapter and is switched
on with ``set_adapters`` (weight 0 gives the base UNet exactly). Runs of one concept share
the token name, so the token is added once and its row is overwritten with each run's vector
before that run's images. The "base" row turns LoRA off and reads ``{token}`` (and any run's
token) as the concept's class word: the base model has never seen the token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError, first_line
from ..files.lora_files import read_embeddings, restore_text_encoder_magnitudes
from ..files.mix_of_show import read_edlora
from ..files.run_dir import RunInfo
from ..models import edlora
from ..models.base import load_base
from ..models.sampling import SampleSettings, generate, sampling_pipeline
from ..models.tokens import set_token_embeddings
from .grid import make_grid
from .labels import BASE_ROW, row_labels


@dataclass
class Comparison:
    """One prompt, every run's images with the same seeds, and the labelled grid of them."""

    prompt: str
    seeds: list[int]
    rows: dict[str, list[Image.Image]]  # run name (or BASE_ROW) -> one image per seed
    labels: dict[str, str]  # the rows' labels (newlines allowed)
    grid: Image.Image

    def items(self) -> list[tuple[Image.Image, str]]:
        """Every image with a one-line caption: ``sgd-sai · lr 0.1 · 500 steps · seed 2``."""
        return [
            (image, f"{self.labels.get(name, name).replace(chr(10), ' · ')} · seed {seed}")
            for name, images in self.rows.items()
            for seed, image in zip(self.seeds, images, strict=True)
        ]


class Comparer:
    """One base model with every run's LoRA loaded as its own adapter.

    ``comparer.runs`` are the given runs, in order; a run whose folder name repeats another's
    (or is "base") is renamed ``parent/name`` there, and that name keys its images.
    Each run's images are drawn holding a lock (``active``): the pipeline's active adapter,
    its weight and the token rows are shared state, so calls from several threads (app
    requests sharing a cached Comparer) never draw one run with another's.

    Raises:
        UserError: no runs, an unfinished run, a run given twice, runs on different base
            models, or files that do not load.
    """

    def __init__(self, runs: Sequence[RunInfo], *, device: str | torch.device | None = None):
        self.runs = _checked_runs(runs)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._lock = threading.Lock()
        # Files first: a bad one should fail before the model loads.
        self._vectors = {r.name: read_embeddings(r.path) for r in self.runs}
        layerwise = {r.name: read_edlora(r.path) for r in self.runs}  # ED-LoRA runs

        cfg, _, _ = _base_source(self.runs).files.read_config()
        self.pipe = sampling_pipeline(load_base(cfg))
        # Tokens before adapters: resizing the embedding table must not meet peft wrappers.
        for vectors in self._vectors.values():
            set_token_embeddings(self.pipe, vectors)
        # ED-LoRA runs: their layer tokens, switched per run like the others, and their words
        self._layer_words: dict[str, edlora.LayerWords | None] = {}
        for r in self.runs:
            found = layerwise[r.name]
            words = found and edlora.apply_layerwise(self.pipe, *found, where=str(r.files.edlora))
            self._layer_words[r.name] = words
            if found:
                self._vectors[r.name] = edlora.vectors_by_token(found[0])
        edlora.set_layer_words(self.pipe.unet, None)
        self._adapters = _adapter_names(self.runs)
        for run in self.runs:
            self._load_lora(run)
        self.pipe.to(self.device)

    def _load_lora(self, run: RunInfo) -> None:
        # Several adapters per model are the point here, and a run without text-encoder LoRA
        # is normal: silence the warnings diffusers and peft give for both.
        lora = run.files.lora
        lora_log = logging.getLogger("diffusers.loaders.lora_base")
        level = lora_log.level
        lora_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(
                    run.path, weight_name=lora.name, adapter_name=self._adapters[run.name]
                )
            restore_text_encoder_magnitudes(self.pipe.text_encoder, lora, self._adapters[run.name])
        except Exception as e:  # diffusers/peft raise ValueError, KeyError, OSError, ...
            raise UserError(
                f"Could not load {lora} onto the base model {run.base_model}: "
                f"{first_line(e)}. Is it a finished sai-train-lora run of this base model?"
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
        column per seed, under ``title`` (default: the prompt)."""
        rows = self.generate(prompt, seeds, **settings)
        if order is not None:
            name_of = {r.path: r.name for r in self.runs}
            names = [name_of[Path(path)] for path in order]
            rows = {n: rows[n] for n in [*names, *(k for k in rows if k not in names)]}
        labels = row_labels(self.runs, with_base=BASE_ROW in rows)
        columns = [f"seed {s}" for s in seeds]
        grid = make_grid(rows, row_labels=labels, col_labels=columns, title=title or prompt)
        return Comparison(prompt, list(seeds), rows, labels, grid)

    @contextlib.contextmanager
    def active(self, run_name: str | None, lora_weight: float = 1.0):
        """Hold the pipeline with run ``run_name``'s LoRA (at ``lora_weight``) and token
        vectors switched on, or with LoRA off for None (the base model)."""
        with self._lock:
            if run_name is None:
                edlora.set_layer_words(self.pipe.unet, None)
                self.pipe.disable_lora()
                try:
                    yield self.pipe
                finally:
                    self.pipe.enable_lora()
                return
            set_token_embeddings(self.pipe, self._vectors[run_name])
            edlora.set_layer_words(self.pipe.unet, self._layer_words[run_name])
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
            f"{r.path} has no {r.files.lora.name}: the run has not finished. Resume it with "
            f"`sai-train-lora --resume {r.path}`, or leave it out of the comparison."
        )
    first = runs[0]
    for run in runs[1:]:
        if run.base_identity != first.base_identity:
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
