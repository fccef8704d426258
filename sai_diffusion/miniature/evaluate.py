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

The judge can be generous with a blob that has a notch, so the shapes are also measured
(``shape.py``). For the prompts that ask a plain background (white, black or blue) and no
sketch, each image's object is cut out by colour and the world's own silhouette of the object
laid over it at the size, rotation and place that fit best: ``shape_iou`` is the mean
intersection over union (an image with no object scores 0) over ``shape_images`` images, and
``base_shape_iou`` the base model's. ``class_shape_iou`` / ``base_class_shape_iou`` fit the
same images with the shape of the concept's class word when that is a world object
("circle"): the world's own hearts fit the heart at 0.96 and the circle at 0.76 at 32 px,
while a blob fits both alike. ``shape_share`` (``base_shape_share``) is the share of measured
images whose object fits the concept's shape at least ``SHAPE_MARGIN`` (0.1) better than the
class word's: what a person would call a heart rather than a round blob. All of them are None
where no prompt asks a plain background (the class figures also without a class shape).

    _, concept, _ = RunDir(run).read_config()
    report = evaluate(run, scorers_for(concept))      # evaluation.evaluator, the one evaluator
    report["concept_fidelity"], report["base_concept_fidelity"]

``scorers_for`` is where a run's scorers are chosen, for sai-eval and the quality benchmark
alike: the judge for a miniature-world concept, CLIP / DINO (``evaluation.alignment``) for any.
The report is written to the run folder as ``eval.json``, where ``sai-compare`` and the app
find it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import Concept
from ..errors import UserError
from ..evaluation.alignment import AlignmentModels, AlignmentScorer
from ..evaluation.evaluator import Drawn
from . import shape, world
from .concept import judged_object, judges
from .judge import Judge, describe

__all__ = ["HEADLINE", "JudgeScorer", "judges", "score_images", "scorers_for"]

HEADLINE = ("concept_fidelity", "prompt_fidelity", "base_concept_fidelity", "base_prompt_fidelity")
CLASS_HEADLINE = ("class_fidelity", "class_prompt_fidelity", "base_class_fidelity")
SHAPE_HEADLINE = ("shape_iou", "class_shape_iou", "shape_share", "base_shape_iou",
                  "base_class_shape_iou", "base_shape_share")  # fmt: skip
# shape_share: an image's object is the concept's shape when it fits it at least this much
# better than the class word's. The world's own 32 px hearts beat the circle by 0.17 or more,
# its circles lose by as much (tests/miniature/test_shape.py); a blob fits both alike.
SHAPE_MARGIN = 0.1


class JudgeScorer:
    """The evaluator's scorer for a miniature-world concept: the judge reads every image
    (module docstring). The base model is asked for the object by its name ("heart"); the
    shapes are also fitted with the concept's class word when it names a world object."""

    headline = ("object", *HEADLINE, *SHAPE_HEADLINE, *CLASS_HEADLINE)

    def __init__(self, obj: str, *, judge: Judge | None = None, class_word: str | None = None):
        self.obj, self.class_word = obj, class_word
        self.judge = judge or Judge.load()

    def base_word(self, concept: Concept) -> str | None:
        return self.obj

    def score(self, drawn: Drawn) -> dict[str, Any]:
        class_text = drawn.concept.class_text  # "circle": the shape a blob would fit as well
        rival = class_text if class_text in world.OBJECTS else None
        scores = score_images(self.judge, self.obj, drawn.rows, class_object=rival)
        report = {"object": self.obj, **scores}
        if self.class_word is not None:  # the class word, for the LoRA and the base model alike
            word = self.class_word
            rows = [(prompt, drawn.draw(prompt.replace("{token}", word)),
                     drawn.draw(prompt.replace("{token}", word), base=True) if drawn.with_base
                     else None) for prompt, _, _ in drawn.rows]  # fmt: skip
            report |= _class_scores(score_images(self.judge, word, rows, shapes=False), word)
        return report


def scorers_for(
    concept: Concept,
    *,
    alignment: AlignmentModels | None = None,
    prompts: str | None = None,
    class_fidelity: bool = False,
) -> list:
    """The scorers of a run of ``concept``: the judge for a miniature-world concept asked its
    own prompts (with ``class_fidelity``, also what the LoRA did to the class word), and CLIP /
    DINO (``alignment``) for any concept.

    Raises:
        UserError: ``class_fidelity`` without the judge or for a class word that is not a world
            object; no scorer at all (a real concept needs CLIP models); a world object the
            world does not have.
    """
    scorers: list = []
    if judges(concept, prompts):
        word = None
        if class_fidelity:
            word = concept.class_text
            if word not in world.OBJECTS:
                raise UserError(
                    f"--class-fidelity judges the class word, and {word!r} (class_word of "
                    f"{concept.path}) is not a world object ({', '.join(world.OBJECTS)})"
                )
        scorers.append(JudgeScorer(judged_object(concept), class_word=word))
    elif class_fidelity:
        raise UserError(
            "--class-fidelity is the judge's, for runs of miniature-world concepts scored on "
            "their own prompts; drop --prompts, or --class-fidelity for other concepts"
        )
    if alignment is not None:
        scorers.append(AlignmentScorer(alignment))
    if not scorers:
        raise UserError(
            f"{concept.path}: runs of {concept.name!r} are scored with CLIP and DINO; pass "
            "--clip-model (and --dino-model)"
        )
    return scorers


def _class_scores(scores: dict, word: str) -> dict:
    """``score_images``' figures for the class ``word``, under their class_* names."""
    return {
        "class_object": word,
        "class_fidelity": scores["concept_fidelity"],
        "class_prompt_fidelity": scores["prompt_fidelity"],
        "base_class_fidelity": scores["base_concept_fidelity"],
        "base_class_prompt_fidelity": scores["base_prompt_fidelity"],
    }


def score_images(
    judge,
    obj: str,
    rows: Sequence[tuple[str, list, list | None]],
    *,
    class_object: str | None = None,
    shapes: bool = True,
) -> dict[str, Any]:
    """Judge ``(prompt, images, base_images or None)`` rows; ``prompt`` holds ``{token}``.

    Returns the four fidelities (base ones None without base images), the image count, the
    shape fits (module docstring; with ``shapes``): ``shape_iou`` against ``obj`` and
    ``class_shape_iou`` against ``class_object``, their ``base_`` twins and ``shape_images``,
    and a per-prompt breakdown: what the prompt asks, and for the run and the base the two
    shares and the mean shape fits (None where the prompt's images are not measured).
    """
    totals = {"run": [0, 0, 0], "base": [0, 0, 0]}  # images, concept shown, prompt followed
    fits: dict[str, list] = {"run": [], "base": []}  # (IoU with obj, with class_object)
    per_prompt = []
    for prompt, images, base_images in rows:
        asks = world.prompt_asks(prompt, "{token}")
        measured = shapes and _plain_photo(asks)
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
            group_fits = (
                _shape_fits(group, asks["background"], obj, class_object) if measured else []
            )
            fits[key] += group_fits
            if shapes:  # None where the prompt's images are not measured
                entry[key] |= _shape_means(group_fits, class_object)
        per_prompt.append(entry)
    run_n, run_shown, run_followed = totals["run"]
    base_n, base_shown, base_followed = totals["base"]
    base_shapes = _shape_means(fits["base"], class_object)
    return {
        "concept_fidelity": _share(run_shown, run_n),
        "prompt_fidelity": _share(run_followed, run_n),
        "base_concept_fidelity": _share(base_shown, base_n) if base_n else None,
        "base_prompt_fidelity": _share(base_followed, base_n) if base_n else None,
        "images": run_n,
        **_shape_means(fits["run"], class_object),
        **{f"base_{k}": v for k, v in base_shapes.items()},
        "shape_images": len(fits["run"]),
        "per_prompt": per_prompt,
    }


def _plain_photo(asks: dict[str, str | None]) -> bool:
    """The prompt asks a plain background (a photo: a sketch has none) and no sketch: the
    object can be cut out by colour."""
    return asks["background"] in world.PLAIN_BACKGROUNDS and asks["style"] != world.SKETCH


def _shape_fits(
    images: list, background: str, obj: str, class_object: str | None
) -> list[tuple[float, float | None]]:
    """Each image's best-fit IoU with ``obj``'s silhouette, and with ``class_object``'s."""
    fits = []
    for image in images:
        mask = shape.silhouette(image, background)
        rival = None if class_object is None else shape.best_fit_iou(mask, class_object)[0]
        fits.append((shape.best_fit_iou(mask, obj)[0], rival))
    return fits


def _shape_means(fits: list[tuple[float, float | None]], class_object: str | None) -> dict:
    """``shape_iou`` and ``class_shape_iou``, the means of ``fits``, and ``shape_share``, the
    share whose first fit beats the second by ``SHAPE_MARGIN``: None where there are no fits
    (the class figures also without a ``class_object``)."""
    own = [f[0] for f in fits]
    rival = [f[1] for f in fits] if class_object is not None else []
    wins = sum(o >= r + SHAPE_MARGIN for o, r in zip(own, rival, strict=False))
    return {
        "shape_iou": round(sum(own) / len(own), 4) if own else None,
        "class_shape_iou": round(sum(rival) / len(rival), 4) if rival else None,
        "shape_share": _share(wins, len(rival)) if rival else None,
    }


def _follows(verdict: dict, asks: dict[str, str | None]) -> bool:
    """The judged image shows every attribute the prompt asked for."""
    return all(want is None or verdict[head] == want for head, want in asks.items())


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0
