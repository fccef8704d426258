"""A run's settings from what the user gave: ``resolve``.

Precedence, lowest first: TrainConfig's defaults, the concept's ``train:`` section, command-line
flags, ``--set``. A setting the command line gives that cannot act given the others is refused;
one a concept YAML sets is left for the run to warn about (``settings.inert_settings``).
"""

from __future__ import annotations

from typing import Any

from .concept import Concept, load_concept
from .loading import parse_set
from .settings import TrainConfig, apply_overrides, setting_paths, validate


def resolve(
    concept_arg: str, flags: dict[str, Any], set_items: list[str]
) -> tuple[TrainConfig, Concept]:
    """Build the run's ``(TrainConfig, Concept)`` from a concept, command-line flags (flat
    names; None: not given) and ``--set`` overrides, and check it.

    Raises:
        UserError: a bad concept, an unknown or bad setting, contradicting settings, or a
            command-line setting that cannot act given the others.
    """
    concept = load_concept(concept_arg)
    cfg = TrainConfig()
    apply_overrides(cfg, concept.train, f"{concept.path}: train")
    given = {k: v for k, v in flags.items() if v is not None}
    overrides = parse_set(set_items)
    apply_overrides(cfg, given, "command line")
    apply_overrides(cfg, overrides, "--set")
    explicit = set(setting_paths(given, "command line")) | set(setting_paths(overrides, "--set"))
    return validate(cfg, "settings", given=explicit, concept=concept), concept
