"""files.run_dir: the run-folder contract (every name as users and other tools read it) and
reading a run back while it may still be written."""

from __future__ import annotations

import os
import shutil
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

DATA = Path(__file__).parent / "data"


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
    assert cfg.lora.rank == 8 and concept.token == "<Vthing>"
    assert data["base_model_hash"] == "sha256:ab"
    assert concept.data == (tmp_path / "run-concept" / "data").resolve()

    # a run written before three dead settings were removed reads the same
    saved = yaml.safe_load(run.run_yaml.read_text())
    saved["config"] |= {"concept": "thing", "output_dir": str(run.path), "num_workers": 0}
    run.run_yaml.write_text(yaml.safe_dump(saved))
    assert run.read_config()[0] == cfg

    run.run_yaml.write_text("config: [not, a, mapping\n")
    with pytest.raises(UserError, match="run.yaml: not valid YAML"):
        run.read_config()
    with pytest.raises(UserError, match="no run.yaml"):
        RunDir(tmp_path / "elsewhere").read_config()


def test_a_run_yaml_written_before_sections_existed_reads_every_setting(tmp_path):
    """data/run-before-sections.yaml is the run.yaml of a run the previous version trained
    (flat settings, text-encoder LoRA, shuffled and templated captions, caption dropout): each
    flat key lands in its section, and the run resumes, samples and compares with it."""
    shutil.copy(DATA / "run-before-sections.yaml", tmp_path / "run.yaml")
    cfg, concept, data = RunDir(tmp_path).read_config()
    flat = yaml.safe_load((DATA / "run-before-sections.yaml").read_text())["config"]
    assert {key: cfg.get(config.FLAT[key]) for key in flat} == flat  # every one, none lost
    added_since = {"prediction_type", "text_encoder_2", "data_workers", "sai_scale"}  # newer
    assert set(flat) == set(config.FLAT) - added_since
    assert (cfg.base.prediction_type, cfg.lora.text_encoder_2) == ("auto", None)  # defaults
    assert (cfg.lora.text_encoder, cfg.optimizer.lr_text_encoder) == (True, 0.01)
    assert (cfg.captions.shuffle, cfg.captions.templates, cfg.captions.dropout) == (True, True, 0.3)
    assert concept.token == "<Vthing>" and data["lr"] == 0.05
    config.validate(cfg, "run.yaml")  # and it is a valid run today
    # written again, it is in sections and reads back the same
    RunDir(tmp_path).write_config(cfg, concept, {})
    written = yaml.safe_load((tmp_path / "run.yaml").read_text())["config"]
    assert written["lora"]["text_encoder"] is True and "text_encoder_lora" not in written
    assert RunDir(tmp_path).read_config()[0] == cfg


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
