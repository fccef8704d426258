"""Bad input to the command-line tools (scripts/bad_inputs.py): each case, run as a real
process, ends with exit code 2 and one ``error:`` line that names what is wrong, with no
traceback and nothing written in its folder; docs/bad-inputs.md is the table the cases print.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bad_inputs", REPO / "scripts" / "bad_inputs.py")
bad_inputs = importlib.util.module_from_spec(_spec)
sys.modules["bad_inputs"] = bad_inputs  # its dataclasses look their module up there
_spec.loader.exec_module(bad_inputs)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bad_inputs.Outcome]:
    """Every case run once, by the harness, under one temporary folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    return {o.case.name: o for o in bad_inputs.run_all(root)}


@pytest.mark.slow  # the first one runs ~29 processes, 12 importing torch: ~1 min on one core
@pytest.mark.parametrize("name", [case.name for case in bad_inputs.CASES])
def test_bad_input_is_refused_with_one_line(outcomes, name):
    """Exit code 2, one error line naming the key, value or file at fault, no traceback, and
    no run folder or other file left behind (nothing is written before the input is good)."""
    outcome = outcomes[name]
    assert outcome.problems() == [], (
        f"{name}: {shlex.join(outcome.case.argv)}\n{outcome.stderr[-4000:]}"
    )


@pytest.mark.slow  # the cases' outcomes
def test_the_table_in_the_docs_is_what_the_cases_print(outcomes):
    doc = REPO / "docs" / "bad-inputs.md"
    table = bad_inputs.render([outcomes[case.name] for case in bad_inputs.CASES])
    assert doc.is_file() and doc.read_text(encoding="utf-8") == table, (
        "docs/bad-inputs.md is stale: run python scripts/bad_inputs.py --write docs/bad-inputs.md"
    )


def test_the_cases_cover_every_tool_and_kind():
    """At least 15 bad inputs, of every kind, given to every command-line tool."""
    cases = bad_inputs.CASES
    assert len(cases) >= 15
    assert len({c.name for c in cases}) == len(cases), "two cases share a name (and a folder)"
    kinds = {c.kind for c in cases}
    assert {"config", "data", "model", "run", "checkpoint", "app"} <= kinds
    assert {c.argv[0] for c in cases} == set(bad_inputs.ENTRY_POINTS)
