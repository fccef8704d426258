"""Who imports whom in sai_diffusion (and the app), read from the code, drawn as a Mermaid graph.

    python scripts/architecture.py                      # print the graph
    python scripts/architecture.py --write docs/dev/architecture.md
    python scripts/architecture.py --check docs/dev/architecture.md   # exit 1 when stale

Every ``import`` and ``from ... import`` of every module counts, those inside functions too (a
lazy import is still a dependency). Modules are grouped into the parts the architecture names
(``PARTS``); an arrow A --> B means some module of A imports one of B (arrows into ``core``,
which every part uses, are left out). The picture in
docs/dev/architecture.md sits between ``BEGIN_MARK`` and ``END_MARK`` and a test keeps it equal
to what this script draws.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

from sai_diffusion.fsutil import generated_block_main

REPO = Path(__file__).resolve().parents[1]
BEGIN_MARK = "<!-- imports: begin (python scripts/architecture.py --write) -->"
END_MARK = "<!-- imports: end -->"

# The layers, lowest first: a part may import the parts of lower layers only.
LAYERS = [
    ["core"], ["optim"], ["config"], ["files"], ["models"], ["training", "compare"],
    ["evaluation"], ["miniature"], ["cli", "app"],
]  # fmt: skip

# part -> the modules in it (by dotted-name prefix), lowest layer first
PARTS = {
    "core": [
        "sai_diffusion.errors",
        "sai_diffusion.fsutil",
        "sai_diffusion._resources",
        "sai_diffusion.machine",
    ],
    "optim": ["sai_diffusion.optim"],
    "config": ["sai_diffusion.config"],
    "files": ["sai_diffusion.files"],
    "models": ["sai_diffusion.models"],
    "training": ["sai_diffusion.training"],
    "compare": ["sai_diffusion.compare"],
    "evaluation": ["sai_diffusion.evaluation"],
    "miniature": ["sai_diffusion.miniature"],
    "cli": ["sai_diffusion.cli", "sai_diffusion.cli_args"],
    "app": ["app"],
}


def module_name(path: Path) -> str:
    """``sai_diffusion/files/run_dir.py`` -> ``sai_diffusion.files.run_dir``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, ours: set[str]) -> set[str]:
    """The modules of ``ours`` that ``path`` imports (relative imports resolved), anywhere in
    the file: ``from .files import ldm`` imports ``...files.ldm``, ``from .files.ldm import
    save_single_file`` imports ``...files.ldm`` too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                module = f"{base}.{alias.name}"
                found.add(module if module in ours else base)
    return {m for m in found if m in ours}


def part_of(module: str) -> str | None:
    for part, prefixes in PARTS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return part
    return None


def source_files() -> list[Path]:
    return sorted([*(REPO / "sai_diffusion").rglob("*.py"), *(REPO / "app").glob("*.py")])


def module_edges() -> dict[str, set[str]]:
    """Every module of ours -> the modules of ours it imports."""
    ours = {module_name(p) for p in source_files()}
    edges = {}
    for path in source_files():
        if path.name == "_build.py":  # setuptools' build hook, never imported by the library
            continue
        if path == REPO / "sai_diffusion" / "__init__.py":  # the version string alone
            continue
        name = module_name(path)
        edges[name] = imports_of(path, ours) - {name}
    return edges


def part_edges() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(part, part) -> the module-to-module imports that join them."""
    joined: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for source, targets in module_edges().items():
        a = part_of(source)
        for target in sorted(targets):
            b = part_of(target)
            if a and b and a != b:
                joined[(a, b)].append((source, target))
    return dict(joined)


def mermaid() -> str:
    """The parts as boxes and an arrow where one imports the other. Arrows into ``core`` are
    left out: every part uses it."""
    order = list(PARTS)
    lines = ["```mermaid", "graph TD"]
    edges = sorted(part_edges().items(), key=lambda e: (order.index(e[0][0]), order.index(e[0][1])))
    for (a, b), _pairs in edges:
        if b != "core":
            lines.append(f"    {a} --> {b}")
    lines.append("```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return generated_block_main(argv, about=__doc__.split("\n")[0], block=mermaid(),
                                begin=BEGIN_MARK, end=END_MARK,
                                command="python scripts/architecture.py")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
