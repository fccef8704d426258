"""Two of the settings kohya users expect (issue 18): caption dropout and an EMA of the trained
tensors, on the tiny model: what they draw, what they save, and their resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sai_diffusion import config
from sai_diffusion.files.lora_files import load_lora_into
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.training import recipe
from tests.helpers import load_pipe, make_concept, run_train

FAST = ["validation_seeds=[]", "checkpoint_every=0"]


@pytest.fixture()
def concept(tmp_path: Path) -> Path:
    return make_concept(tmp_path / "concept", n=4)


def _setup(concept, base, out, *settings, steps=3):
    flags = {"base_model": str(base), "resolution": 64, "max_steps": steps, "batch_size": 4}
    cfg, c = config.resolve(str(concept), flags, [*FAST, *settings])
    return recipe.setup(cfg, c, out)


def test_caption_dropout_empties_captions_per_example_and_the_cache_holds_the_empty_one(
    concept, tiny_pipeline_dir, tmp_path
):
    never = _setup(concept, tiny_pipeline_dir, tmp_path / "a")
    always = _setup(concept, tiny_pipeline_dir, tmp_path / "b", "caption_dropout=1")
    half = _setup(concept, tiny_pipeline_dir, tmp_path / "c", "caption_dropout=0.5")
    assert all(c for c in recipe._batch(never, 0)["captions"])
    assert recipe._batch(always, 0)["captions"] == [""] * 4
    assert "" in always.cache["text"] and "" not in never.cache["text"]
    drawn = []
    for step in range(6):  # 24 examples at p 0.5: both kinds, and the same again per step
        half.step = step
        drawn += recipe._batch(half, 0)["captions"]
        assert recipe._batch(half, 0)["captions"] == drawn[-4:]
    half.step = 0
    assert "" in drawn and any(drawn)
    # the other draws (noise, timesteps, latents) are those of the run without dropout
    a, b = recipe._batch(never, 0), recipe._batch(always, 0)
    for key in ("noise", "timesteps", "latents"):
        assert torch.equal(a[key], b[key]), key
    # and the run trains
    recipe.train(always)


def test_the_ema_is_the_average_of_the_steps_and_its_files_load_in_diffusers(
    concept, tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "run"
    run = _setup(concept, tiny_pipeline_dir, out, "ema_decay=0.5", "text_encoder_lora=true")
    values = [{n: p.detach().clone() for n, p in run.trainable.items()}]
    for _ in range(3):
        recipe._train_step(run)
        values.append({n: p.detach().clone() for n, p in run.trainable.items()})
    for name in run.trainable:
        want = values[0][name]
        for v in values[1:]:
            want = 0.5 * want + 0.5 * v[name]
        torch.testing.assert_close(run.ema[name], want, rtol=0, atol=1e-7)
    recipe.save_outputs(run)
    ema, raw = RunDir(out).ema, RunDir(out)
    assert ema.lora.is_file() and ema.kohya.is_file() and ema.embeddings.is_file()
    # the files hold the averages: an up factor, alpha / rank folded in (lora_files' rule)
    name = next(n for n in run.trainable if n.startswith("unet.") and ".lora_B." in n)
    key = "unet." + name[len("unet.") :].replace(".lora_B.default.weight", ".lora.up.weight")
    scale = run.cfg.alpha / run.cfg.rank
    torch.testing.assert_close(load_file(ema.lora)[key], run.ema[name] * scale, rtol=0, atol=1e-7)
    assert not torch.equal(load_file(raw.lora)[key], load_file(ema.lora)[key])
    # the raw tensors are back after the EMA's files were written
    for name, p in run.trainable.items():
        assert torch.equal(p, values[-1][name])
    pipe = load_pipe(tiny_pipeline_dir)  # stock diffusers loads the EMA's set like a run
    load_lora_into(pipe, ema.path)


@pytest.mark.slow  # three training processes: ~20 s
def test_a_run_with_ema_resumes_bitwise(concept, tiny_pipeline_dir, tmp_path):
    common = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--resolution",
              "64", "--set", "validation_seeds=[]", "--set", "ema_decay=0.9",
              "--set", "caption_dropout=0.3", "--checkpoint-every", "2"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_train(*common, "--max-steps", "4", "--output-dir", str(whole)).returncode == 0
    assert run_train(*common, "--max-steps", "2", "--output-dir", str(cut)).returncode == 0
    resumed = run_train(*common, "--max-steps", "4", "--output-dir", str(cut), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    for name in ("lora.safetensors", "ema/lora.safetensors", "ema/embeddings.safetensors"):
        want, got = load_file(whole / name), load_file(cut / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
