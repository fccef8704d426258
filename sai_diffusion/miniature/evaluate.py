"""``sai-eval``: did a run learn its concept? The miniature world's judge reads the images.

A concept of the built-in world (``configs/concepts/demo.yaml``) names, in its ``evaluation``
section, the world object its token stands for and the prompts to test, including ones its
training captions never used (other colours and backgrounds, "a pencil sketch of {token}").
Every prompt is generated with every seed (DPM-Solver++, fixed steps and guidance, latents
drawn on the CPU from the seed), and the judge (``judge.py``) says what each image shows:

- ``concept_fidelity``: the share of images that show the concept's object;
- ``prompt_fidelity``: the share that show it *and* what the prompt asked of it (colour,
  background, photo or sketch; ``world.prompt_asks`` reads that from the prompt);
- ``base_concept_fidelity`` / ``base_prompt_fidelity``: the same for the base model without
  the LoRA, asked in its own words (``{token}`` becomes the object's name, "heart"): how much
  of the concept the base model already had;
- with ``class_fidelity=True`` (``sai-eval --class-fidelity``), what the LoRA did to the
  concept's class (DreamBooth's language drift, which prior preservation is for): the same
  prompts with ``{token}`` read as the class word ("circle"), drawn with the LoRA and judged
  for the class object, as ``class_fidelity`` / ``class_prompt_fidelity``, beside the base
  model's ``base_class_fidelity`` / ``base_class_prompt_fidelity``.

    report = evaluate_run(Path("runs/demo/sgd-sai-lr0.1"))
    report["concept_fidelity"], report["base_concept_fidelity"]

The report is also written to the run folder as ``eval.json``, where ``sai-compare`` and the
app find it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..compare.comparer import Comparer
from ..errors import UserError
from ..evaluation.alignment import AlignmentModels
from ..evaluation.runs import alignment_scores, keep_images, training_images
from ..evaluation.runs import headline as alignment_headline
from ..files.run_dir import RunDir, load_run_info
from ..models.sampling import SCHEDULER, SampleSettings, generate_batch
from . import world
from .concept import judged_object
from .judge import Judge, describe

__all__ = ["HEADLINE", "evaluate_run", "headline", "score_images"]

HEADLINE = ("concept_fidelity", "prompt_fidelity", "base_concept_fidelity", "base_prompt_fidelity")
CLASS_HEADLINE = ("class_fidelity", "class_prompt_fidelity", "base_class_fidelity")


def evaluate_run(
    run_dir: Path,
    *,
    seeds: Sequence[int] | None = None,
    with_base: bool = True,
    device: str | None = None,
    write: bool = True,
    base_cache: dict | None = None,
    alignment: AlignmentModels | None = None,
    class_fidelity: bool = False,
) -> dict[str, Any]:
    """Score one finished run (see the module docstring); ``seeds`` default to the concept's.

    ``base_cache``: a dict shared between calls (``sai-eval RUN_DIR...`` passes one) in which
    the base model's images are kept per base model, prompts, seeds, steps, guidance and
    resolution, so runs of one concept on one base model generate them once.

    Raises:
        UserError: not a finished run, or its concept is not a miniature-world concept (no
            ``evaluation`` section naming a world object), or ``class_fidelity`` for a class
            word that is not a world object.
    """
    run = RunDir(run_dir)
    _, concept, _ = run.read_config()
    obj = judged_object(concept, run_dir=run.path)
    if class_fidelity and concept.class_text not in world.OBJECTS:
        raise UserError(
            f"{run_dir}: --class-fidelity judges the class word, and {concept.class_text!r} "
            f"(class_word of {concept.path}) is not a world object ({', '.join(world.OBJECTS)})"
        )
    spec = concept.evaluation
    info = load_run_info(run.path)
    if not info.has_lora:
        raise UserError(
            f"{run_dir}: unfinished run (no {run.lora.name} yet); resume it with "
            f"sai-train-lora --resume {run_dir}, then evaluate it"
        )
    seeds = list(seeds) if seeds is not None else list(spec["seeds"])
    if not seeds:
        raise UserError("sai-eval: give at least one seed")
    comparer = Comparer([info], device=device)
    judge = Judge.load()
    settings = SampleSettings(steps=spec["steps"], guidance_scale=spec["guidance"],
                              height=info.resolution, width=info.resolution)  # fmt: skip

    def generate(text: str) -> list[Image.Image]:
        return generate_batch(comparer.pipe, text, seeds, settings)

    # Only a base model with a content hash can be recognised again by another run.
    base_key = None
    if with_base and base_cache is not None and info.base_model_hash:
        base_key = (
            info.base_model_hash, obj, tuple(spec["prompts"]), tuple(seeds), spec["steps"],
            spec["guidance"], info.resolution, str(comparer.pipe.device),
        )  # fmt: skip
    cached = base_cache.get(base_key) if base_key is not None else None
    rows = _rows(comparer, generate, spec["prompts"], concept.text,
                 obj if with_base else None, cached)  # fmt: skip
    if base_key is not None and cached is None:
        base_cache[base_key] = [base_images for _, _, base_images in rows]

    report = score_images(judge, obj, rows)
    if class_fidelity:  # the class word, for the LoRA and the base model alike
        word = concept.class_text
        class_rows = _rows(comparer, generate, spec["prompts"], word, word if with_base else None)
        report |= _class_scores(score_images(judge, word, class_rows), word)
    if alignment is not None:  # the same images, kept and scored by CLIP / DINO too
        kept = keep_images(info.files, rows, seeds)
        report |= alignment_scores(alignment, kept, training_images(concept, run), obj)
    report = {
        "run": str(run_dir),
        "concept": concept.name,
        "object": obj,
        **report,
        "settings": {
            "seeds": seeds,
            "steps": spec["steps"],
            "guidance": spec["guidance"],
            "sampler": SCHEDULER,
            "resolution": info.resolution,
            "prompts": len(spec["prompts"]),
            "base_prompts": "{token} read as " + repr(obj) if with_base else None,
        },
    }
    if write:
        run.write_scores(report)
    return report


def _rows(comparer, generate, prompts, run_word: str, base_word: str | None, cached=None):
    """``(prompt, images, base_images)`` per prompt: the run's images with ``{token}`` read as
    ``run_word``, the base model's with ``base_word`` (``cached[i]`` when given; None when
    ``base_word`` is None)."""
    rows = []
    for i, prompt in enumerate(prompts):
        with comparer.active(comparer.runs[0].name):
            images = generate(prompt.replace("{token}", run_word))
        base_images = None
        if cached is not None:
            base_images = cached[i]
        elif base_word is not None:
            with comparer.active(None):
                base_images = generate(prompt.replace("{token}", base_word))
        rows.append((prompt, images, base_images))
    return rows


def _class_scores(scores: dict, word: str) -> dict:
    """``score_images``' figures for the class ``word``, under their class_* names."""
    return {
        "class_object": word,
        "class_fidelity": scores["concept_fidelity"],
        "class_prompt_fidelity": scores["prompt_fidelity"],
        "base_class_fidelity": scores["base_concept_fidelity"],
        "base_class_prompt_fidelity": scores["base_prompt_fidelity"],
    }


def score_images(judge, obj: str, rows: Sequence[tuple[str, list, list | None]]) -> dict[str, Any]:
    """Judge ``(prompt, images, base_images or None)`` rows; ``prompt`` holds ``{token}``.

    Returns the four fidelities (base ones None without base images), the image count and a
    per-prompt breakdown: what the prompt asks, and the two shares for the run and the base.
    """
    totals = {"run": [0, 0, 0], "base": [0, 0, 0]}  # images, concept shown, prompt followed
    per_prompt = []
    for prompt, images, base_images in rows:
        asks = world.prompt_asks(prompt, "{token}")
        entry: dict[str, Any] = {"prompt": prompt, "asks": asks}
        for key, group in (("run", images), ("base", base_images)):
            if group is None:
                continue
            verdicts = judge.predict(group)
            shown = [v["object"] == obj for v in verdicts]
            followed = [s and _follows(v, asks) for s, v in zip(shown, verdicts, strict=True)]
            totals[key][0] += len(group)
            totals[key][1] += sum(shown)
            totals[key][2] += sum(followed)
            entry[key] = {
                "concept_fidelity": _share(sum(shown), len(group)),
                "prompt_fidelity": _share(sum(followed), len(group)),
                "judged": [describe(v) for v in verdicts],
            }
        per_prompt.append(entry)
    run_n, run_shown, run_followed = totals["run"]
    base_n, base_shown, base_followed = totals["base"]
    return {
        "concept_fidelity": _share(run_shown, run_n),
        "prompt_fidelity": _share(run_followed, run_n),
        "base_concept_fidelity": _share(base_shown, base_n) if base_n else None,
        "base_prompt_fidelity": _share(base_followed, base_n) if base_n else None,
        "images": run_n,
        "per_prompt": per_prompt,
    }


def _follows(verdict: dict, asks: dict[str, str | None]) -> bool:
    """The judged image shows every attribute the prompt asked for."""
    return all(want is None or verdict[head] == want for head, want in asks.items())


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The one-line summary ``sai-eval`` prints (with CLIP / DINO figures when scored)."""
    keys = ("run", "concept", "object", *HEADLINE, "images")
    line = {k: report.get(k) for k in keys}
    line |= {k: report[k] for k in CLASS_HEADLINE if k in report}
    return {**line, **alignment_headline(report)}
