"""The settings reference, generated from the declarations in ``settings``: one table per
section, every setting with its flat name, type, default, accepted values and help.

    python -m sai_diffusion.config.reference --write docs/training.md   # between the marks
    python -m sai_diffusion.config.reference --check docs/training.md   # exit 1 when stale

A test keeps docs/training.md's copy equal to what this writes.
"""

from __future__ import annotations

import sys
import textwrap
import types
import typing

from ..fsutil import generated_block_main
from .loading import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES
from .settings import MAX_STEPS, SECTIONS, SETTINGS, TrainConfig

BEGIN_MARK = "<!-- settings: begin (python -m sai_diffusion.config.reference --write) -->"
END_MARK = "<!-- settings: end -->"


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(args[0])}"
    return {bool: "true / false", int: "integer", float: "number", str: "text"}.get(hint, str(hint))


def _value(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "(none)"
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return f"{value:g}" if isinstance(value, float) else str(value)


def _accepts(info) -> str:
    if info.choices:
        return " / ".join(info.choices)
    return info.rule.text.removeprefix("must be ").removeprefix("must ") if info.rule else ""


def _table(paths: list[str]) -> list[str]:
    rows = ["| setting | flat name | type | default | accepts | what it does |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        info = SETTINGS[path]
        flat = info.flat if info.flat != path else ""
        doc = info.doc.replace("|", "\\|")
        rows.append(f"| `{path}` | {f'`{flat}`' if flat else ''} | {_type_name(info.type)} | "
                    f"`{_value(info.default)}` | {_accepts(info)} | {doc} |")  # fmt: skip
    return rows


def _checks() -> str:
    """What every run's settings are held to, before a model loads (``settings.validate``,
    ``loading.load_yaml``)."""
    return textwrap.fill(
        "Every setting is checked before a model loads, and a bad one ends the command with exit "
        "code 2 and one line naming it: numbers are finite and in the range below, step counts "
        f"and intervals at most {MAX_STEPS:_}, seeds in [0, 2**63), and a prompt names the "
        "concept as `{token}`, its only placeholder. Concept files, the settings a run folder "
        f"keeps and `--set` values are YAML of at most {MAX_YAML_BYTES // 1024} KiB in which no "
        "key is given twice; aliases (`&lr 1e-4` ... `*lr`) are allowed while the document, "
        f"written out, holds at most {MAX_YAML_VALUES:,} values and {MAX_YAML_DEPTH} levels.",
        width=96,
    )


def markdown() -> str:
    """The reference, as it stands between the marks in docs/training.md."""
    hints = typing.get_type_hints(TrainConfig)
    top = [p for p in SETTINGS if "." not in p]
    lines = [_checks(), "", "### Run", "",
             "Top-level settings: `--set max_steps=800`, `max_steps: 800`.", "",
             *_table(top)]  # fmt: skip
    for name in SECTIONS:
        cls = hints[name]
        first = next(p for p in SETTINGS if p.startswith(name + "."))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += ["", f"### `{name}`", "", f"{doc} `--set {first}=...`, or in YAML `{name}: "
                  f"{{{first.split('.')[1]}: ...}}`.", "",
                  *_table([p for p in SETTINGS if p.startswith(name + ".")])]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return generated_block_main(argv, about=__doc__.split("\n")[0], block=markdown(),
                                begin=BEGIN_MARK, end=END_MARK,
                                command="python -m sai_diffusion.config.reference")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
