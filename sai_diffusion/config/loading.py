"""Reading settings: YAML with YAML 1.2's booleans, ``--set key=value`` items, and the closest
valid name for a typo."""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml

from ..errors import UserError, first_line


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false. PyYAML follows YAML 1.1, which also
    reads yes / no / on / off as booleans and so turned ``mixed_precision: no`` into False; here
    a word stays a word, and a boolean setting accepts the words itself (``settings.coerce``)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (settings files, run.yaml, ``--set`` values) with 1.2 booleans."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no arbitrary objects


def yaml_problem(error: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where (PyYAML's spans lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or first_line(error)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


# names other trainers use for our settings, suggested when they are typed here
_ALIASES = {
    "learning_rate": "lr",
    "train_batch_size": "batch_size",
    "steps": "max_steps",
    "max_train_steps": "max_steps",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "gradient_accumulation_steps": "grad_accum",
}


def closest(key: str, valid) -> str:
    """`` (did you mean 'x'?)`` for the valid name nearest ``key``, or "". Another trainer's
    name for a setting (``_ALIASES``) wins over spelling likeness."""
    valid = list(valid)
    if _ALIASES.get(key) in valid:
        return f" (did you mean '{_ALIASES[key]}'?)"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:  # a near-miss of another trainer's name
        alias = next(iter(difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.8)), None)
        match = [_ALIASES[alias]] if alias and _ALIASES[alias] in valid else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "lora.targets=to_q,to_v"]`` -> ``{"lr": 0.1, ...}`` (values parsed as
    YAML; keys as given, flat or ``section.key``)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set noise_offset=0.01")
        try:
            out[key.strip()] = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out
