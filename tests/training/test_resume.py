"""training.resume: which folder --resume names and which settings a resumed run keeps, read
from run.yaml alone (no model library loads)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sai_diffusion import config
from sai_diffusion.errors import UserError
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.training.resume import resume_dir, resumed_settings
from tests.helpers import make_concept

FLAGS = {"rank": None, "lr": None, "optimizer": None, "max_steps": None}


def _run(root, name="run", *settings):
    concept = make_concept(root / f"{name}-concept")
    cfg, c = config.resolve(str(concept), {"rank": 8, "max_steps": 10}, list(settings))
    run = RunDir(root / name)
    run.write_config(cfg, c, {"lr": cfg.resolved_lr(c)})
    return run, concept, cfg


def test_the_command_that_started_the_run_resumes_it_and_only_the_length_may_change(tmp_path):
    run, concept, cfg = _run(tmp_path, "run", "lr_scheduler=linear")
    same, _ = resumed_settings(run, str(concept), {**FLAGS, "rank": 8}, ["lr_scheduler=linear"])
    assert same == cfg
    longer, _ = resumed_settings(run, None, {**FLAGS, "max_steps": 20}, [])
    assert longer.max_steps == 20 and longer.lora == cfg.lora
    with pytest.raises(UserError) as info:
        resumed_settings(run, None, {**FLAGS, "rank": 4}, ["optimizer.schedule=cosine"])
    message = str(info.value)
    assert "lora.rank (rank): 8 in run.yaml, 4 given" in message
    assert "optimizer.schedule (lr_scheduler): 'linear' in run.yaml, 'cosine' given" in message
    assert "only --max-steps and data_workers may change" in message
    concept.write_text(concept.read_text() + "train: {rank: 2}\n")  # the concept file changed
    with pytest.raises(UserError, match="train.rank: None when the run started, 2 now"):
        resumed_settings(run, str(concept), FLAGS, [])


def test_resume_names_one_folder_or_the_latest_with_checkpoints(tmp_path):
    older, _, _ = _run(tmp_path, "older")
    time.sleep(0.01)
    newer, _, _ = _run(tmp_path, "newer")
    older.checkpoints_dir.mkdir()
    assert resume_dir("latest", str(tmp_path)) == older.path  # only it has checkpoints
    newer.checkpoints_dir.mkdir()
    newer.run_yaml.touch()
    assert resume_dir("latest", str(tmp_path)) == newer.path
    assert resume_dir(str(older.path), None) == older.path
    with pytest.raises(UserError, match="give one folder"):
        resume_dir(str(older.path), str(newer.path))
    with pytest.raises(UserError, match="not a run folder"):
        resume_dir(str(tmp_path), None)
    with pytest.raises(UserError, match="no run with checkpoints"):
        resume_dir("latest", str(tmp_path / "empty"))


def test_the_resume_contract_loads_no_model_library():
    code = ("import sys\nimport sai_diffusion.training.resume\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
