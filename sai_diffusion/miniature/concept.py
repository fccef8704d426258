"""A miniature-world concept: the world object its token stands for, named in the concept's
``evaluation`` section and checked here, where the world is known (``config`` only checks
that it is a name). No torch: the command line and the quality benchmark ask before training."""

from __future__ import annotations

from pathlib import Path

from ..config import Concept
from ..errors import UserError
from . import world


def judged_object(concept: Concept, *, run_dir: Path | None = None) -> str:
    """The world object a miniature-world concept's token stands for (its ``evaluation``
    section's ``object``), checked against the world.

    Raises:
        UserError: the concept has no evaluation section or no object (it is not of the
            miniature world), or the object is not one of the world's.
    """
    spec = concept.evaluation
    obj = (spec or {}).get("object")
    if obj is None:
        where = f"{run_dir}: the concept" if run_dir is not None else "The concept"
        raise UserError(
            f"{where} '{concept.name}' ({concept.path}) has no evaluation section naming a "
            "world object. sai-eval scores concepts of the built-in miniature world (e.g. "
            "--concept demo) with its judge; compare other runs by eye with sai-compare."
        )
    if obj not in world.OBJECTS:
        raise UserError(
            f"{concept.path}: evaluation.object must name the world object the token stands "
            f"for, one of {', '.join(world.OBJECTS)}; got {obj!r}"
        )
    return obj


def judges(concept: Concept, prompts: str | None = None) -> bool:
    """Whether the judge scores runs of ``concept``: a miniature-world concept (its evaluation
    names a world object) asked its own prompts."""
    return bool(concept.evaluation and concept.evaluation.get("object")) and prompts is None
