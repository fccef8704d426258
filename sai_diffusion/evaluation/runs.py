"""``sai-eval`` on any run: generate the concept's evaluation prompts over fixed seeds, keep the
images in ``RUN/eval/``, and score them with CLIP (text and image alignment) and DINO against
the concept's training images (``alignment``), beside the base model asked with the class word.

Prompts, first found: ``--prompts`` (a file, one prompt with ``{token}`` per line, or a shipped
set: ``person``, ``object``, ``style`` in ``configs/eval_prompts/``), the concept's
``evaluation.prompts``, its validation prompts.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .._resources import configs_dir
from ..compare.comparer import Comparer
from ..config import EVALUATION_DEFAULTS, Concept
from ..errors import UserError
from ..files.run_dir import RunDir, RunInfo, load_run_info, sample_name, write_prompts
from ..fsutil import atomic_path
from ..models.sampling import SCHEDULER, SampleSettings, generate_batch
from ..training.data import discover_examples
from .alignment import AlignmentModels, all_pairs_mean, text_alignment

PROMPT_SETS = ("person", "object", "style")
ALIGNMENT = ("clip_t", "clip_t_mos", "clip_i", "dino")


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


def _save(images: Sequence[Image.Image], folder: Path, index: int, seeds: Sequence[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, seed in zip(images, seeds, strict=True):
        with atomic_path(folder / sample_name(index, seed)) as tmp:
            image.save(tmp, format="PNG")


def generate_and_keep(
    comparer: Comparer,
    info: RunInfo,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SampleSettings,
    *,
    with_base: bool,
    base_word: str,
) -> list[tuple[str, list[Image.Image], list[Image.Image] | None]]:
    """Every prompt with every seed for the run (and the base model, ``{token}`` read as
    ``base_word``), kept by ``keep_images``. ``(prompt, images, base images or None)`` per
    prompt."""
    rows = []
    for prompt in prompts:
        with comparer.active(comparer.runs[0].name):
            images = generate_batch(comparer.pipe, prompt.replace("{token}", info.token), seeds,
                                    settings)  # fmt: skip
        base_images = None
        if with_base:
            with comparer.active(None):
                base_images = generate_batch(comparer.pipe, prompt.replace("{token}", base_word),
                                             seeds, settings)  # fmt: skip
        rows.append((prompt, images, base_images))
    return keep_images(info.files, rows, seeds)


def keep_images(run: RunDir, rows, seeds: Sequence[int]):
    """Save the images of ``rows`` in ``RUN/eval/`` (the base model's in ``eval/base/``) as
    ``pNN-sS.png`` with the prompts beside them, replacing an earlier evaluation's; return
    ``rows``."""
    for base in (False, True):
        folder = run.eval_images(base=base)
        if base and not any(r[2] is not None for r in rows):
            continue
        for old in folder.glob("p*-s*.png") if folder.is_dir() else ():
            old.unlink()
        for i, (_, images, base_images) in enumerate(rows):
            _save(base_images if base else images, folder, i, seeds)
        write_prompts(folder, [r[0] for r in rows])
    return rows


def alignment_scores(
    models: AlignmentModels,
    rows: Sequence[tuple[str, list[Image.Image], list[Image.Image] | None]],
    references: Sequence[Image.Image],
    class_text: str,
) -> dict[str, Any]:
    """The figures of every prompt and over all, for the run and (``base_*``) the base model.
    CLIP-T reads each prompt with ``{token}`` said as ``class_text``."""
    ref_clip = models.clip_images(references)
    ref_dino = models.dino_images(references) if models.dino is not None else None
    per_prompt = []
    for prompt, images, base_images in rows:
        entry: dict[str, Any] = {"prompt": prompt}
        text = prompt.replace("{token}", class_text)
        for prefix, group in (("", images), ("base_", base_images)):
            if group is None:
                continue
            clip = models.clip_images(group)
            t, t_mos = text_alignment(clip, models.clip_texts([text] * len(group)))
            entry |= {f"{prefix}clip_t": t, f"{prefix}clip_t_mos": t_mos,
                      f"{prefix}clip_i": all_pairs_mean(clip, ref_clip)}  # fmt: skip
            if ref_dino is not None:
                entry[f"{prefix}dino"] = all_pairs_mean(models.dino_images(group), ref_dino)
        per_prompt.append(entry)
    keys = [k for k in per_prompt[0] if k != "prompt"]
    # every prompt has as many images: the overall mean is the mean of the prompts' means
    overall = {k: round(statistics.fmean(e[k] for e in per_prompt), 4) for k in keys}
    for entry in per_prompt:
        entry.update({k: round(entry[k], 4) for k in keys})
    return {
        **overall,
        "alignment": {
            "clip_model": models.clip_source,
            "dino_model": models.dino_source,
            "text": f"the prompt with {{token}} read as {class_text!r}",
            "references": len(references),
            "per_prompt": per_prompt,
        },
    }


def evaluate_alignment(
    run_dir: Path,
    models: AlignmentModels,
    *,
    prompts: str | None = None,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    with_base: bool = True,
    device: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score one finished run of any concept (module docstring); written to ``eval.json``.

    Raises:
        UserError: an unfinished run, no training images, bad prompts.
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
    references = training_images(concept, run)
    settings = SampleSettings(
        steps=steps or spec["steps"],
        guidance_scale=guidance if guidance is not None else spec["guidance"],
        height=info.resolution,
        width=info.resolution,
    )
    comparer = Comparer([info], device=device)
    rows = generate_and_keep(comparer, info, texts, seeds, settings, with_base=with_base,
                             base_word=concept.class_text)  # fmt: skip
    report = {
        "run": str(run_dir),
        "concept": concept.name,
        **alignment_scores(models, rows, references, concept.class_text),
        "images": len(texts) * len(seeds),
        "settings": {
            "seeds": seeds,
            "steps": settings.steps,
            "guidance": settings.guidance_scale,
            "sampler": SCHEDULER,
            "resolution": info.resolution,
            "prompts": len(texts),
            "images": str(run.eval_images()),
            "base_prompts": f"{{token}} read as {concept.class_text!r}" if with_base else None,
        },
    }
    if write:
        run.write_scores(report)
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The alignment figures of a report, for ``sai-eval``'s line."""
    keys = [k for k in (*ALIGNMENT, *(f"base_{k}" for k in ALIGNMENT)) if k in report]
    return {k: report[k] for k in keys}
