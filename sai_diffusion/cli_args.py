"""The rules the command-line tools hold their flags to, as argparse types.

    p.add_argument("--seed", type=cli_args.seed, action="append")
    p.add_argument("--out", type=cli_args.out_file)

A value that breaks its rule ends the command in argparse's exit code 2, with one line that
names the flag and the rule (``sai-sample: error: argument --seed: must be a whole number in
[0, 2**63), got 99999999999999999999999``), before any file is written or model loaded. The
output paths are checked for their shape only (a file where a folder is wanted, a folder under
a file); what a command may overwrite is the command's own rule.

Plain Python on purpose, like ``errors``: ``--help`` and a typo must answer at once.
"""

from __future__ import annotations

import math
from argparse import ArgumentTypeError
from pathlib import Path

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): torch's generators take 64-bit seeds
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0
MAX_RESOLUTION = 4096
PLACEHOLDER = "{token}"  # in a prompt: the run's concept words


def _shown(text: str, limit: int = 40) -> str:
    """At most ``limit`` characters of a bad value: an error line stays one short line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _whole(text: str, low: int, high: int, rule: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ArgumentTypeError(f"must be {rule}, got {_shown(text)}")
    return value


def _finite(text: str, rule: str, low: float = -math.inf, high: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):  # nan fails every comparison
        raise ArgumentTypeError(f"must be {rule}, got {_shown(text)}")
    return value


# ------------------------------------------------------------------------------------ numbers
def seed(text: str) -> int:
    return _whole(text, 0, SEED_LIMIT - 1, "a whole number in [0, 2**63)")


def steps(text: str) -> int:
    """Sampler steps: 0 would draw nothing, and a negative count was taken as the default."""
    return _whole(text, 1, MAX_STEPS, f"a whole number in [1, {MAX_STEPS}]")


def guidance(text: str) -> float:
    """Classifier-free guidance scale; nan would turn guidance off without a word."""
    rule = f"a number in [0, {MAX_GUIDANCE:g}] (1 or less: no guidance)"
    return _finite(text, rule, 0, MAX_GUIDANCE)


def lora_weight(text: str) -> float:
    return _finite(text, "a finite number (0: the base model, 1: the trained strength)")


def resolution(text: str) -> int:
    """An image side the pipelines take: the VAE works in blocks of 8 pixels (the UNet pads a
    latent side its levels do not divide), as training's own rule says."""
    rule = f"a multiple of 8 in [8, {MAX_RESOLUTION}] (e.g. 512)"
    side = _whole(text, 8, MAX_RESOLUTION, rule)
    if side % 8:
        raise ArgumentTypeError(f"must be {rule}, got {side}")
    return side


# ------------------------------------------------------------------------------------ prompts
def prompt_template(text: str) -> str:
    """A prompt in which ``{token}`` is the only placeholder and no other brace appears: the
    tools fill it by plain replacement, so ``{tokn}`` or a lone ``{`` would reach the model as
    written, without the concept."""
    rest = text.replace(PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        start = min(i for i in (rest.find("{"), rest.find("}")) if i >= 0)
        end = rest.find("}", start)
        bad = rest[start : end + 1] if rest[start] == "{" and end > start else rest[start]
        raise ArgumentTypeError(
            f"{_shown(text)!r} has {_shown(bad, 20)!r}: {PLACEHOLDER} is the only placeholder "
            "(the run's words), and a prompt takes no other braces"
        )
    return text


# -------------------------------------------------------------------------------- output paths
def _under_a_file(path: Path) -> Path | None:
    """The nearest existing folder above ``path`` that is in fact a file, if any."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def out_dir(text: str) -> str:
    """A folder to write into, new or existing: not a file, not under one."""
    path = Path(text)
    above = _under_a_file(path)
    if above is not None:
        raise ArgumentTypeError(f"{text} is under {above}, which is a file; give a folder "
                                "elsewhere")  # fmt: skip
    if path.exists() and not path.is_dir():
        raise ArgumentTypeError(f"{text} is a file, not a folder; give a folder (a new one, or "
                                "one to add to)")  # fmt: skip
    return text


def out_file(text: str) -> str:
    """A file to write, new or existing: not a folder, not under a file."""
    path = Path(text)
    above = _under_a_file(path)
    if above is not None:
        raise ArgumentTypeError(f"{text} is under {above}, which is a file; give a file name "
                                "in a folder")  # fmt: skip
    if path.is_dir():
        raise ArgumentTypeError(f"{text} is a folder; give the name of the file to write (in "
                                "it or elsewhere)")  # fmt: skip
    return text
