"""files.run_dir: the run-folder contract (every name as users and other tools read it) and
reading a run back while it may still be written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from sai_diffusion import config
from sai_diffusion.errors import UserError
from sai_diffusion.files.run_dir import (
    RunDir,
    find_runs,
    index_runs,
    latest_run,
    read_samples,
    sample_name,
    write_prompts,
)
from tests.helpers import make_concept


def test_the_names_are_the_contract(tmp_path):
    run = RunDir(tmp_path)
    names = {
        run.run_yaml: "run.yaml", run.metrics: "metrics.jsonl", run.lora: "lora.safetensors",
        run.kohya: "lora_kohya.safetensors", run.embeddings: "embeddings.safetensors",
        run.gsnr: "gsnr.json", run.scores: "eval.json", run.tensorboard: "tensorboard",
    }  # fmt: skip
    assert all(path == tmp_path / name for path, name in names.items())
    assert run.samples() == tmp_path / "samples" / "final"
    checkpoint = run.checkpoint(250)
    assert checkpoint.path == tmp_path / "checkpoints" / "step-000250"
    files = (checkpoint.trainable, checkpoint.optimizer, checkpoint.lr_scheduler,
             checkpoint.scaler, checkpoint.state)  # fmt: skip
    assert [f.name for f in files] == [
        "trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "scaler.pt", "state.json",
    ]  # fmt: skip
    assert sample_name(3, 7) == "p03-s7.png"


def _written_run(root: Path, name: str = "run") -> RunDir:
    cfg, concept = config.resolve(str(make_concept(root / f"{name}-concept")), {"rank": 8}, [])
    run = RunDir(root / name)
    run.write_config(cfg, concept, {"lr": 0.05, "base_model_hash": "sha256:ab", "token_ids": [9]})
    return run


def test_run_yaml_round_trips_and_old_runs_still_read(tmp_path):
    run = _written_run(tmp_path)
    cfg, concept, data = run.read_config()
    assert cfg.rank == 8 and concept.token == "<Vthing>" and data["base_model_hash"] == "sha256:ab"
    assert concept.data == (tmp_path / "run-concept" / "data").resolve()

    # a run written before three dead settings were removed reads the same
    saved = yaml.safe_load(run.run_yaml.read_text())
    saved["config"] |= {"concept": "thing", "output_dir": str(run.path), "num_workers": 0}
    run.run_yaml.write_text(yaml.safe_dump(saved))
    assert run.read_config()[0] == cfg

    run.run_yaml.write_text("config: [not, a, mapping\n")
    with pytest.raises(UserError, match="unreadable run file"):
        run.read_config()
    with pytest.raises(UserError, match="no run.yaml"):
        RunDir(tmp_path / "elsewhere").read_config()


def test_metrics_append_read_and_truncate(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    with run.metrics.open("a") as f:
        f.write('{"step": 4, "lo')  # a line being written
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.truncate_metrics(2)  # a resume from step 2 writes the rest again
    assert run.metrics.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


def test_only_complete_checkpoints_count(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (2, 4):
        run.checkpoint(step).path.mkdir(parents=True)
        run.checkpoint(step).write_state(step)
    run.checkpoint(6).path.mkdir()  # killed before state.json: incomplete
    assert [c.path.name for c in run.checkpoint_folders()] == [
        "step-000002", "step-000004", "step-000006"]  # fmt: skip
    step, checkpoint = run.latest_checkpoint()
    assert step == 4 and checkpoint == run.checkpoint(4)


def test_samples_are_read_back_with_their_prompts_and_seeds(tmp_path):
    prompts = ["a photo of <V>", "a pencil sketch of <V>"]
    for i in range(2):
        for seed in (1, 12):
            (tmp_path / sample_name(i, seed)).write_bytes(b"png")
    write_prompts(tmp_path, prompts)
    found = [(s.path.name, s.prompt, s.seed) for s in read_samples(tmp_path)]
    assert found == [
        ("p00-s1.png", prompts[0], 1), ("p00-s12.png", prompts[0], 12),
        ("p01-s1.png", prompts[1], 1), ("p01-s12.png", prompts[1], 12),
    ]  # fmt: skip
    assert read_samples(tmp_path / "missing") == []


def test_runs_are_found_keyed_and_the_latest_resumable_one_picked(tmp_path):
    first = _written_run(tmp_path / "potter", "a")
    second = _written_run(tmp_path / "hermione", "a")  # same folder name, another concept
    (tmp_path / "notes").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.yaml").write_text(":")
    (first.path / "checkpoints").mkdir()
    assert [r.path for r in find_runs(tmp_path)] == [second.path.resolve(), first.path.resolve()]
    index = index_runs(tmp_path)
    assert sorted(index) == ["hermione/a", "potter/a"]
    assert index["potter/a"].lr == 0.05 and not index["potter/a"].has_lora
    assert index["potter/a"].base_identity == "sha256:ab"

    assert latest_run(tmp_path) == first  # the only one with checkpoints
    (second.path / "checkpoints").mkdir()
    os.utime(second.run_yaml, (time.time() + 10, time.time() + 10))
    assert latest_run(tmp_path) == second
    assert index["potter/a"].validation_prompts == [
        "a photo of <Vthing>",
        "a pencil sketch of <Vthing>",
    ]
