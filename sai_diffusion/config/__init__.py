"""Run configuration: the concept YAML (``concept``), every training setting in sections with
its checks (``settings``), YAML and ``--set`` parsing (``loading``), ``resolve`` (a run's config
from a concept, flags and overrides) and the generated settings reference (``reference``).

Plain Python and YAML (no torch): the command line's ``--help`` and every check of a setting run
before any model library loads. How a run folder stores these (``run.yaml``) is
``files.run_dir``'s business.
"""

from .concept import (
    EVALUATION_DEFAULTS,
    Concept,
    available_concepts,
    concepts_dir,
    find_concept,
    load_concept,
    random_init_std,
)
from .loading import closest, load_yaml, parse_set, yaml_problem
from .resolve import resolve
from .settings import (
    BUILTIN_BASE_MODEL,
    DEFAULT_LORA_TARGETS,
    DEFAULT_LR,
    FLAT,
    SECTIONS,
    SETTINGS,
    TEXT_ENCODER_LORA_TARGETS,
    Inert,
    TrainConfig,
    apply_overrides,
    describe,
    inert_settings,
    setting_paths,
    validate,
)

__all__ = [
    "BUILTIN_BASE_MODEL", "DEFAULT_LORA_TARGETS", "DEFAULT_LR", "EVALUATION_DEFAULTS", "FLAT",
    "SECTIONS", "SETTINGS", "TEXT_ENCODER_LORA_TARGETS", "Concept", "Inert", "TrainConfig",
    "apply_overrides", "available_concepts", "closest", "concepts_dir", "describe", "find_concept",
    "inert_settings", "load_concept", "load_yaml", "parse_set", "random_init_std", "resolve",
    "setting_paths", "validate", "yaml_problem",
]  # fmt: skip
