"""models.inference: the one way a finished run is loaded for drawing (sai-sample, the
comparer, the app, sai-eval), against the run's files in a stock diffusers pipeline."""

from __future__ import annotations

import pytest
import torch

from sai_diffusion.errors import UserError
from sai_diffusion.files.run_dir import load_run_info
from sai_diffusion.models.inference import RunModels, load_run
from sai_diffusion.models.sampling import SampleSettings, generate
from tests.helpers import load_pipe, make_concept, outputs, train_tiny


@pytest.fixture(scope="module")
def two_runs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    concept = make_concept(root / "concept")
    common = ["--set", "validation_seeds=[]", "--lr", "0.01", "--set", "train_embeddings=true"]
    return [train_tiny(concept, tiny_pipeline_dir, root / name, "adamw", *common, *extra)
            for name, extra in (("a", []), ("b", ["--set", "text_encoder_lora=true",
                                                  "--seed", "3"]))]  # fmt: skip


def test_each_run_switched_on_computes_what_its_files_give_alone(tiny_pipeline_dir, two_runs):
    """Two runs of one concept share the word's name: switching overwrites its row and the
    adapter, so each computes exactly what loading its files into a fresh stock pipeline does,
    at any weight; None is the base model."""
    models = RunModels([load_run_info(r) for r in two_runs], device="cpu")
    for run, info in zip(two_runs, models.runs, strict=True):
        for weight in (1.0, 0.5):
            alone = load_pipe(tiny_pipeline_dir)
            load_run(alone, run, weight=weight)
            with models.active(info.name, weight) as pipe:
                got = outputs(pipe)
            want = outputs(alone)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    with models.active(None) as pipe:
        base = outputs(pipe)
    stock = outputs(load_pipe(tiny_pipeline_dir))
    torch.testing.assert_close(base["unet"], stock["unet"], rtol=0, atol=0)


def test_the_native_scheduler_draws_as_the_stock_pipeline_does(tiny_pipeline_dir, two_runs):
    """sai-sample's model: the run on the model's own scheduler, images equal to the stock
    pipeline's with the run loaded."""
    settings = SampleSettings(steps=3, height=64, width=64)
    models = RunModels([load_run_info(two_runs[1])], device="cpu", scheduler="native")
    with models.active(models.runs[0].name) as pipe:
        ours = generate(pipe, "a pencil sketch of <Vthing>", 4, settings)
    stock = load_pipe(tiny_pipeline_dir)
    load_run(stock, two_runs[1])
    assert type(models.pipe.scheduler) is type(stock.scheduler)
    assert ours.tobytes() == generate(stock, "a pencil sketch of <Vthing>", 4, settings).tobytes()


def test_a_run_without_its_lora_or_given_twice_is_refused(tiny_pipeline_dir, two_runs, tmp_path):
    with pytest.raises(UserError, match="given twice"):
        RunModels([load_run_info(two_runs[0])] * 2)
    with pytest.raises(UserError, match="lora.safetensors not found"):
        load_run(load_pipe(tiny_pipeline_dir), tmp_path)
