"""The resume contract: which folder ``--resume`` names, and which settings may change.

``--resume RUN_DIR`` appended to the command that started the run is accepted (what people type
after a crash); a setting that differs from the run's ``run.yaml`` is refused, naming both
values, and only the length (``--max-steps``) and ``RESULT_NEUTRAL`` settings may change. ``--resume latest`` picks the run
under ``--output-dir`` (default ``runs/``) whose run.yaml changed last, among those with
checkpoints.

Plain Python (no torch): a wrong resume answers before any model library loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..config import (
    Concept,
    TrainConfig,
    apply_overrides,
    describe,
    load_concept,
    parse_set,
    setting_paths,
)
from ..config import validate as validate_settings
from ..errors import UserError
from ..files.run_dir import RUN_FILE, RunDir, latest_run

# settings that change how fast a run goes, never what it trains: a resumed run may change them
RESULT_NEUTRAL = ("compute.data_workers",)


def resume_dir(value: str, output_dir: str | None) -> Path:
    """The run folder ``--resume value`` names (``latest``: the newest resumable run).

    Raises:
        UserError: not a run folder, a different --output-dir, or no run to resume.
    """
    if value != "latest":
        if output_dir and Path(output_dir).resolve() != Path(value).resolve():
            raise UserError(
                f"--resume {value} continues that folder, but --output-dir says {output_dir}; "
                "give one folder (or --resume latest to pick the newest run under --output-dir)"
            )
        run = RunDir(value)
        if not run.is_run:
            raise UserError(f"--resume {value}: not a run folder (no {run.run_yaml.name} in it)")
        return run.path
    root = Path(output_dir) if output_dir else Path("runs")
    latest = latest_run(root)
    if latest is None:
        raise UserError(f"--resume latest: no run with checkpoints under {root}/")
    return latest.path


def resumed_settings(
    run: RunDir,
    concept_arg: str | None,
    flags: dict[str, Any],
    set_items: list[str],
) -> tuple[TrainConfig, Concept]:
    """The settings a resumed run continues with: its run.yaml's, with ``max_steps`` from the
    command line when given, after checking that the command says nothing else different.

    Raises:
        UserError: the command differs from run.yaml (each difference named), or run.yaml is
            unreadable.
    """
    cfg, concept, _ = run.read_config()
    differ = []
    if concept_arg:  # the concept file as it is now against the one the run started from
        named = load_concept(concept_arg)
        if named.path != concept.path:
            differ.append(f"concept: {concept.path} in {RUN_FILE}, {named.path} given")
        for key in sorted(set(named.train) | set(concept.train)):
            if named.train.get(key) != concept.train.get(key):
                differ.append(
                    f"{named.path.name} train.{key}: {concept.train.get(key)!r} when the run "
                    f"started, {named.train.get(key)!r} now"
                )
    # what the command says itself: its flags and --set
    given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    given = setting_paths(given | parse_set(set_items), "command line")
    max_steps = given.pop("max_steps", None)
    # how many processes prepare the examples changes nothing they contain: another machine
    # may resume with another count
    neutral = {path: given.pop(path) for path in RESULT_NEUTRAL if path in given}
    probe = apply_overrides(copy.deepcopy(cfg), given, "command line")

    def value(c: TrainConfig, path: str) -> object:  # lr: the one the run trains at
        return c.resolved_lr(concept) if path == "optimizer.lr" else c.get(path)

    differ += [
        f"{describe(path)}: {value(cfg, path)!r} in {RUN_FILE}, {value(probe, path)!r} given"
        for path in given
        if value(probe, path) != value(cfg, path)
    ]
    if differ:
        raise UserError(
            f"--resume {run.path}: the command differs from the run's {RUN_FILE} "
            f"({'; '.join(differ)}); a resumed run keeps its settings (only --max-steps and "
            "data_workers may change): drop these, or start a new run in another --output-dir"
        )
    if max_steps is not None:
        apply_overrides(cfg, {"max_steps": max_steps}, "command line")
    apply_overrides(cfg, neutral, "command line")
    return validate_settings(cfg, str(run.run_yaml)), concept
