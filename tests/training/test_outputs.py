"""training.outputs: the EMA of the trained tensors (its average, its checkpoint names, the
averages applied for writing and the raw values back), and the EMA's own file set of a run,
loaded like a run's and resumed bitwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sai_diffusion.files.lora_files import diffusers_key
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.models.inference import load_run
from sai_diffusion.training import recipe
from sai_diffusion.training.outputs import EMA
from tests.helpers import load_pipe, make_concept, run_train, setup_run


def test_the_ema_averages_each_step_and_applies_and_restores():
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4)  # the table a concept's vectors are baked into
    trained = {"unet.w": nn.Parameter(torch.randn(3, 2)),
               "text_encoder.vectors": nn.Parameter(torch.randn(2, 4))}  # fmt: skip
    ema = EMA(trained, decay=0.75)
    history = [{n: p.detach().clone() for n, p in trained.items()}]
    for _ in range(3):
        with torch.no_grad():
            for p in trained.values():
                p.add_(torch.randn_like(p))
        ema.update()
        history.append({n: p.detach().clone() for n, p in trained.items()})
    for name in trained:
        want = history[0][name]
        for values in history[1:]:
            want = 0.75 * want + 0.25 * values[name]
        torch.testing.assert_close(ema.average[name], want, rtol=0, atol=1e-7)
    assert set(ema.state) == {"ema:unet.w", "ema:text_encoder.vectors"}
    assert ema.state["ema:unet.w"] is ema.average["unet.w"]  # restoring writes into them

    class Encoder(nn.Module):
        def get_input_embeddings(self):
            return embedding

    table = embedding.weight.detach().clone()
    with ema.applied(Encoder(), token_ids=[7, 8]):
        assert torch.equal(trained["unet.w"], ema.average["unet.w"])
        assert torch.equal(embedding.weight[7:9], ema.average["text_encoder.vectors"])
    assert torch.equal(trained["unet.w"], history[-1]["unet.w"])
    assert torch.equal(embedding.weight, table)


@pytest.fixture()
def concept(tmp_path: Path) -> Path:
    return make_concept(tmp_path / "concept", n=4)


def test_the_ema_is_the_average_of_the_steps_and_its_files_load_in_diffusers(
    concept, tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "run"
    run = setup_run(concept, tiny_pipeline_dir, out, "ema_decay=0.5", "text_encoder_lora=true")
    values = [{n: p.detach().clone() for n, p in run.trainable.items()}]
    for _ in range(3):
        recipe.train_step(run)
        values.append({n: p.detach().clone() for n, p in run.trainable.items()})
    for name in run.trainable:
        want = values[0][name]
        for v in values[1:]:
            want = 0.5 * want + 0.5 * v[name]
        torch.testing.assert_close(run.ema.average[name], want, rtol=0, atol=1e-7)
    recipe.save_outputs(run)
    ema, raw = RunDir(out).ema, RunDir(out)
    assert ema.lora.is_file() and ema.kohya.is_file() and ema.embeddings.is_file()
    # the files hold the averages: an up factor, alpha / rank folded in (lora_files' rule)
    name = next(n for n in run.trainable if n.startswith("unet.") and ".lora_B." in n)
    key = diffusers_key("unet", name[len("unet.") :].removesuffix(".lora_B.default.weight"), "up")
    scale = run.cfg.lora.alpha / run.cfg.lora.rank
    want = run.ema.average[name] * scale
    torch.testing.assert_close(load_file(ema.lora)[key], want, rtol=0, atol=1e-7)
    assert not torch.equal(load_file(raw.lora)[key], load_file(ema.lora)[key])
    # the raw tensors are back after the EMA's files were written
    for name, p in run.trainable.items():
        assert torch.equal(p, values[-1][name])
    pipe = load_pipe(tiny_pipeline_dir)  # stock diffusers loads the EMA's set like a run
    load_run(pipe, ema.path)


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
