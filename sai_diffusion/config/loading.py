"""Reading settings: YAML with YAML 1.2's booleans and bounds, ``--set key=value`` items, the
closest valid name for a typo, and values quoted short in error messages.

Every YAML the package reads (concept files, run.yaml, ``--set`` values) goes through
``load_yaml``, which refuses what a settings file never needs and a hostile one would use:

- more than ``MAX_YAML_BYTES`` (a concept file is about 1 KB, a run.yaml 3 KB; PyYAML reads
  ~100 KB/s, so the bound is also one of time);
- a key given twice in one mapping (PyYAML keeps the last one without a word);
- more than ``MAX_YAML_VALUES`` values with every alias written out, nesting deeper than
  ``MAX_YAML_DEPTH``, or an alias inside its own anchor. Aliases stay allowed (``&lr 1e-4``
  ... ``*lr``): the bound is on what they expand to, checked on the composed document before
  any value is built. A "billion laughs" (nested aliases: 400 bytes, 10^9 values) is refused.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, first_line

MAX_YAML_BYTES = 256 * 1024
MAX_YAML_VALUES = 10_000  # scalars, lists and mappings, aliases written out
MAX_YAML_DEPTH = 32  # a run.yaml nests 4 deep (config: lora: targets: [...])


class YamlRefused(yaml.MarkedYAMLError):
    """YAML that PyYAML reads and we refuse (the module's docstring): ``problem`` says what,
    ``problem_mark`` where (when one place is at fault), ``note`` the way out."""


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false. PyYAML follows YAML 1.1, which also
    reads yes / no / on / off as booleans and so turned ``mixed_precision: no`` into False; here
    a word stays a word, and a boolean setting accepts the words itself (``settings.coerce``).

    It also refuses deep nesting while composing (PyYAML's composer recurses: a file of 10^5
    ``[`` would end in RecursionError), aliases that expand too far once a document is
    composed, and a key repeated in a mapping while constructing it."""

    _depth = 0
    _aliased = False  # the document uses an alias

    def compose_node(self, parent, index):
        self._aliased = self._aliased or self.check_event(yaml.AliasEvent)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YamlRefused(problem=f"nested more than {MAX_YAML_DEPTH} levels deep",
                                  problem_mark=self.peek_event().start_mark)  # fmt: skip
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node, aliased=self._aliased)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class refuses it
                continue
            if first is not None:
                where = _places(first, key_node.start_mark)
                raise YamlRefused(problem=f"key {short(key)} is given twice, {where}",
                                  note="keep one")  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _places(a: yaml.Mark, b: yaml.Mark) -> str:
    if a.line == b.line:
        return f"at line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"
    return f"at lines {a.line + 1} and {b.line + 1}"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node, *, aliased: bool) -> None:
    """Refuse a composed document that, with its aliases written out, holds more than
    MAX_YAML_VALUES values or nests deeper than MAX_YAML_DEPTH, or that holds an alias inside
    its own anchor. An alias is the very node of its anchor, so each node is sized once (a
    billion laughs costs its ~100 nodes here), depth first without recursion."""
    size: dict[int, tuple[int, int]] = {}  # id(node): (values, depth), aliases written out
    entered: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            kids = [size[id(k)] for k in _children(node)]
            values = 1 + sum(v for v, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            if values > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
                raise _too_large(node, too_many=values > MAX_YAML_VALUES, aliased=aliased)
            size[id(node)] = (values, depth)
        elif id(node) in entered:
            if id(node) not in size:  # met again below itself
                raise YamlRefused(problem="an alias inside its own anchor (a value that holds "
                                  "itself)", problem_mark=node.start_mark)  # fmt: skip
        else:
            entered.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in _children(node))


def _too_large(node: yaml.Node, *, too_many: bool, aliased: bool) -> YamlRefused:
    where = node.start_mark
    if not aliased:  # then only the count can be too large: compose_node bounds the depth
        return YamlRefused(problem=f"more than {MAX_YAML_VALUES:,} values", problem_mark=where,
                           note="a settings file holds a few hundred")  # fmt: skip
    said = (f"expand to more than {MAX_YAML_VALUES:,} values" if too_many
            else f"nest more than {MAX_YAML_DEPTH} levels deep")  # fmt: skip
    return YamlRefused(
        problem=f"aliases that {said}",
        problem_mark=where,
        note="a settings file holds a few hundred values: write them out",
    )


def load_yaml(text: str) -> Any:
    """Parse YAML text (settings files, run.yaml, ``--set`` values) with 1.2 booleans and the
    module's bounds.

    Raises:
        YamlRefused: too large, a repeated key, aliases that expand too far, a value PyYAML
            cannot build (an integer of 5,000 digits, the date 2001-02-30).
        yaml.YAMLError: not YAML.
    """
    if len(text) > MAX_YAML_BYTES:
        raise YamlRefused(problem=f"{len(text):,} characters, more than the "
                          f"{MAX_YAML_BYTES:,} a settings file may hold")  # fmt: skip
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no arbitrary objects
    except (ValueError, OverflowError) as exc:  # raised by PyYAML's int and date constructors
        raise YamlRefused(
            problem=f"a value that cannot be read ({clip(first_line(exc), 80)})"
        ) from None


def read_yaml_file(path: Path) -> Any:
    """``load_yaml`` of a file, its size checked before it is read.

    Raises:
        UserError: naming the file: unreadable, too large, not UTF-8, not YAML, or refused.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or first_line(exc)})") from None
    if len(data) > MAX_YAML_BYTES:
        raise UserError(
            f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB, and a settings file is a few KB; "
            "is it the right file?"
        )
    try:
        return load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid YAML ({first_line(exc)}); save it as UTF-8") from None
    except YamlRefused as exc:
        raise UserError(f"{path}: {yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None


def yaml_problem(error: Exception) -> str:
    """A YAML parse error in one line: what is wrong, where (PyYAML's spans lines) and, for
    ``YamlRefused``, the way out."""
    mark = getattr(error, "problem_mark", None)
    problem = clip(getattr(error, "problem", None) or first_line(error), 120)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    note = getattr(error, "note", None) if isinstance(error, YamlRefused) else None
    return problem + where + (f"; {note}" if note else "")


# ------------------------------------------------------------------------- error messages
_QUOTE = reprlib.Repr()  # never writes out more than 8 items a level, 3 levels deep
_QUOTE.maxlevel = 3
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = _QUOTE.maxdict = 8
_QUOTE.maxstring = _QUOTE.maxlong = _QUOTE.maxother = 400  # cut by ``clip``, not in the middle


def clip(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, at most ``limit`` characters. Built
    from a bounded repr: a value of 10^9 items (a YAML alias bomb) is never written out."""
    try:
        text = _QUOTE.repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        text = f"<{type(value).__name__} too long to print>"
    return clip(text, limit)


# ---------------------------------------------------------------------------- names, --set
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
    if len(key) > 100:  # no name is this long
        return ""
    if _ALIASES.get(key) in valid:
        return f" (did you mean '{_ALIASES[key]}'?)"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:  # a near-miss of another trainer's name
        alias = next(iter(difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.8)), None)
        match = [_ALIASES[alias]] if alias and _ALIASES[alias] in valid else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "lora.targets=to_q,to_v"]`` -> ``{"lr": 0.1, ...}`` (values parsed as
    YAML, or kept as text when they are not YAML; keys as given, flat or ``section.key``).

    Raises:
        UserError: an item without ``=``, or a value ``load_yaml`` refuses.
    """
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(
                f"--set {short(item)}: expected key=value, e.g. --set noise_offset=0.01"
            )
        try:
            out[key] = load_yaml(raw) if raw.strip() else None
        except YamlRefused as exc:
            raise UserError(f"--set {clip(key)}: {yaml_problem(exc)}") from None
        except yaml.YAMLError:
            out[key] = raw
    return out
