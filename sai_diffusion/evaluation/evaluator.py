"""``sai-eval``: one evaluator for any run, with the scorers the run calls for.

    report = evaluate(run_dir, [AlignmentScorer(models)])             # CLIP-T, CLIP-I, DINO
    report = evaluate(run_dir, scorers_for(concept, alignment=...))   # + the miniature's judge

The evaluator draws every evaluation prompt with every seed (DPM-Solver++, fixed steps and
guidance, latents from the seed on the CPU) with the run's LoRA, and with the base model asked
in its own words (``{token}`` read as the scorers' ``base_word``, else the concept's class
word), keeps the images in ``RUN/eval/`` (the base model's in ``RUN/eval/base/``), hands them
to each scorer and writes the merged report to ``eval.json``.

Prompts, first found: ``prompts`` (a file, one prompt with ``{token}`` per line, or a shipped
set: ``person``, ``object``, ``style`` in ``configs/eval_prompts/``), the concept's
``evaluation.prompts``, its validation prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageOps

from .._resources import configs_dir
from ..config import EVALUATION_DEFAULTS, Concept
from ..errors import UserError
from ..files.concept_data import discover_examples
from ..files.run_dir import RunDir, load_run_info, sample_name, write_prompts
from ..fsutil import atomic_path
from ..models.inference import RunModels
from ..models.sampling import SCHEDULER, SampleSettings, generate_batch

PROMPT_SETS = ("person", "object", "style")

# (prompt with {token}, the run's images, the base model's images or None), per prompt
Rows = list[tuple[str, list[Image.Image], list[Image.Image] | None]]


@dataclass
class Drawn:
    """What a scorer reads: the concept, its run folder, the images of every prompt, the words
    the base model was asked with, and ``draw`` for more images with the same seeds and
    sampler (``draw(text, base=False)``: the run; ``base=True``: the base model)."""

    concept: Concept
    run: RunDir
    rows: Rows
    base_word: str
    with_base: bool
    draw: Callable[..., list[Image.Image]]


class Scorer(Protocol):
    """A way to score a run's images (``evaluation.alignment.AlignmentScorer``,
    ``miniature.evaluate.JudgeScorer``)."""

    headline: tuple[str, ...]  # the report's keys sai-eval prints on its line

    def base_word(self, concept: Concept) -> str | None:
        """How the base model is asked for the concept (None: no preference)."""

    def score(self, drawn: Drawn) -> dict[str, Any]:
        """Figures to merge into the report."""


def prompt_set_path(name: str) -> Path:
    return configs_dir() / "eval_prompts" / f"{name}.txt"


def read_prompts(source: str) -> list[str]:
    """A shipped set's prompts, or a file's (one per line, blank lines and # comments skipped).

    Raises:
        UserError: no such file or set, no prompts, or a prompt without ``{token}``.
    """
    path = prompt_set_path(source) if source in PROMPT_SETS else Path(source)
    if not path.is_file():
        raise UserError(
            f"--prompts {source}: no such file; give a text file with one prompt per line "
            f"(each with {{token}}) or one of the shipped sets: {', '.join(PROMPT_SETS)}"
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [p for p in prompts if "{token}" not in p]
    if not prompts or bad:
        raise UserError(
            f"{path}: {'a prompt without {token}: ' + repr(bad[0]) if bad else 'no prompts'}; "
            "write one prompt per line, each naming the concept as {token}"
        )
    return prompts


def evaluation_prompts(concept: Concept, source: str | None = None) -> list[str]:
    if source is not None:
        return read_prompts(source)
    if concept.evaluation and concept.evaluation.get("prompts"):
        return list(concept.evaluation["prompts"])
    return list(concept.validation_prompts)


def training_images(concept: Concept, run: RunDir) -> list[Image.Image]:
    """The concept's training images as stored (EXIF orientation applied, RGB; masks aside).

    Raises:
        UserError: the data folder is gone or holds no images.
    """
    try:
        examples = discover_examples(concept.data, token=concept.text)
    except UserError as exc:
        raise UserError(
            f"{run.path}: image alignment compares with the concept's training images, and "
            f"they cannot be read: {exc}"
        ) from None
    images = []
    for example in examples:
        with Image.open(example.image_path) as image:
            images.append(ImageOps.exif_transpose(image).convert("RGB"))
    return images


def keep_images(run: RunDir, rows: Rows, seeds: Sequence[int]) -> None:
    """Save the images of ``rows`` in ``RUN/eval/`` (the base model's in ``eval/base/``) as
    ``pNN-sS.png`` with the prompts beside them, replacing an earlier evaluation's."""
    for base in (False, True):
        folder = run.eval_images(base=base)
        if base and not any(r[2] is not None for r in rows):
            continue
        for old in folder.glob("p*-s*.png") if folder.is_dir() else ():
            old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for i, (_, images, base_images) in enumerate(rows):
            for image, seed in zip(base_images if base else images, seeds, strict=True):
                with atomic_path(folder / sample_name(i, seed)) as tmp:
                    image.save(tmp, format="PNG")
        write_prompts(folder, [r[0] for r in rows])


def evaluate(
    run_dir: Path,
    scorers: Sequence[Scorer],
    *,
    prompts: str | None = None,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    with_base: bool = True,
    device: str | None = None,
    write: bool = True,
    base_cache: dict | None = None,
) -> dict[str, Any]:
    """Score one finished run with ``scorers`` (module docstring); written to ``eval.json``
    (and the images to ``RUN/eval/``) unless ``write`` is False.

    ``base_cache``: a dict shared between calls in which the base model's images are kept per
    base model, words, prompts, seeds, steps, guidance and resolution, so runs of one concept on
    one base model draw them once.

    Raises:
        UserError: an unfinished run, no seeds, bad prompts, or what a scorer refuses.
    """
    run = RunDir(run_dir)
    _, concept, _ = run.read_config()
    info = load_run_info(run.path)
    if not info.has_lora:
        raise UserError(
            f"{run_dir}: unfinished run (no {run.lora.name} yet); resume it with "
            f"sai-train-lora --resume {run_dir}, then evaluate it"
        )
    spec = {**EVALUATION_DEFAULTS, **(concept.evaluation or {})}
    seeds = list(seeds) if seeds is not None else list(spec["seeds"])
    if not seeds:
        raise UserError("sai-eval: give at least one seed")
    texts = evaluation_prompts(concept, prompts)
    base_word = next((w for s in scorers if (w := s.base_word(concept))), concept.class_text)
    settings = SampleSettings(
        steps=steps or spec["steps"],
        guidance_scale=guidance if guidance is not None else spec["guidance"],
        height=info.resolution,
        width=info.resolution,
    )
    models = RunModels([info], device=device)
    name = models.runs[0].name

    def draw(text: str, *, base: bool = False) -> list[Image.Image]:
        with models.active(None if base else name) as pipe:
            return generate_batch(pipe, text, seeds, settings)

    key = None  # only a base model with a content hash can be recognised by another run
    if with_base and base_cache is not None and info.base_model_hash:
        key = (info.base_model_hash, base_word, tuple(texts), tuple(seeds), settings.steps,
               settings.guidance_scale, info.resolution, str(models.device))  # fmt: skip
    cached = base_cache.get(key) if key is not None else None
    rows: Rows = []
    for i, prompt in enumerate(texts):
        images = draw(prompt.replace("{token}", info.token))
        base_images = cached[i] if cached is not None else None
        if with_base and base_images is None:
            base_images = draw(prompt.replace("{token}", base_word), base=True)
        rows.append((prompt, images, base_images))
    if key is not None and cached is None:
        base_cache[key] = [r[2] for r in rows]
    if write:
        keep_images(run, rows, seeds)

    drawn = Drawn(concept, run, rows, base_word, with_base, draw)
    report: dict[str, Any] = {"run": str(run_dir), "concept": concept.name}
    for scorer in scorers:
        report |= scorer.score(drawn)
    report |= {
        "images": len(texts) * len(seeds),
        "settings": {
            "seeds": seeds,
            "steps": settings.steps,
            "guidance": settings.guidance_scale,
            "sampler": SCHEDULER,
            "resolution": info.resolution,
            "prompts": len(texts),
            "images": str(run.eval_images()),
            "base_prompts": f"{{token}} read as {base_word!r}" if with_base else None,
        },
    }
    if write:
        run.write_scores(report)
    return report


def headline(report: dict[str, Any], scorers: Sequence[Scorer]) -> dict[str, Any]:
    """The one line ``sai-eval`` prints of a report: the run, its concept, each scorer's
    headline figures, the image count."""
    line = {k: report[k] for k in ("run", "concept")}
    for scorer in scorers:
        line |= {k: report[k] for k in scorer.headline if k in report}
    return {**line, "images": report["images"]}
