"""The app's fixtures, shared by its test modules: two tiny trained runs and one ``sai-app``
over them, made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sai_diffusion import cli
from tests.app.helpers import RUNS, serving
from tests.helpers import make_concept, train_tiny


@pytest.fixture(scope="session")
def runs_dir(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished tiny runs (sgd-sai with one of the 3 images held out, adamw; 2 steps at
    64 px), a folder that is not a run and a run.yaml that does not parse, in ``runs/``;
    ``secret.txt`` lies beside ``runs/``, the concept in ``concept/thing.yaml``."""
    root = tmp_path_factory.mktemp("app")
    concept = make_concept(root / "concept")
    runs = root / "runs"
    for optimizer, name in RUNS.items():
        held_out = ["--set", "validation_split=0.34"] if optimizer == "sgd-sai" else []
        train_tiny(concept, tiny_pipeline_dir, runs / name, optimizer, *held_out,
                   "--set", "validation_seeds=[1]", "--set", "sample_steps=2")  # fmt: skip
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run")
    (runs / "broken").mkdir()
    (runs / "broken" / "run.yaml").write_text("config: [unclosed")
    (root / "secret.txt").write_text("outside the runs folder")
    return runs


@pytest.fixture(scope="session")
def server(runs_dir: Path) -> Iterator[str]:
    """``sai-app --runs-dir runs/`` on 127.0.0.1: its URL."""
    with serving(runs_dir) as url:
        yield url


@pytest.fixture(scope="session")
def app_module():
    return cli.load_app()
