"""Mixed precision is real on the CPU: ``mixed_precision=fp16`` runs the recipe under
``torch.autocast("cpu", float16)`` with a CPU GradScaler (the CUDA path), ``bf16`` under bf16
autocast; the trained tensors stay fp32, SGD-SaI takes g-SNR on unscaled gradients, a step with
an inf gradient is skipped and is not SGD-SaI's first step, and a run resumes bitwise.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sai_diffusion import cli
from sai_diffusion.training import recipe
from tests.helpers import make_concept, setup_run, train_tiny

SETTINGS = ("--set", "validation_seeds=[]", "--set", "text_encoder_lora=true",
            "--set", "train_embeddings=true")  # fmt: skip


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return make_concept(tmp_path_factory.mktemp("concept"))


def _compute_dtypes(run) -> set[torch.dtype]:
    """The dtype every UNet attention projection computes in during one training step."""
    seen, hooks = set(), []
    for name, module in run.unet.named_modules():
        if name.endswith("to_q.base_layer"):
            hooks.append(module.register_forward_hook(lambda m, a, out: seen.add(out.dtype)))
    recipe.train_step(run)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16),
                                                  ("bf16", torch.bfloat16)])  # fmt: skip
def test_half_precision_runs_under_autocast_with_fp32_trained_tensors(
    concept, tiny_pipeline_dir, tmp_path, precision, dtype
):
    run = setup_run(concept, tiny_pipeline_dir, tmp_path / "run", "embeddings.train=true",
                    "lora.text_encoder=true", f"mixed_precision={precision}", steps=3)  # fmt: skip
    assert _compute_dtypes(run) == {dtype}
    assert next(run.pipe.unet.parameters()).dtype in (dtype, torch.float32)
    assert {p.dtype for p in run.trainable.values()} == {torch.float32}
    assert (run.accelerator.scaler is not None) == (precision == "fp16")
    recipe.train_step(run)
    assert all(torch.isfinite(p).all() for p in run.trainable.values())


def test_fp16_on_the_cpu_matches_fp32_to_rounding_and_records_its_loss_scale(
    concept, tiny_pipeline_dir, tmp_path
):
    runs = {p: train_tiny(concept, tiny_pipeline_dir, tmp_path / p, "sgd-sai", *SETTINGS,
                          "--set", f"mixed_precision={p}", steps=3)
            for p in ("no", "fp16")}  # fmt: skip
    a, b = (
        load_file(str(runs["no"] / "lora.safetensors")),
        load_file(str(runs["fp16"] / "lora.safetensors")),
    )
    for key in a:
        scale = a[key].abs().max().item() or 1.0
        assert (a[key] - b[key]).abs().max().item() <= 0.02 * scale, key
    records = [
        json.loads(line) for line in (runs["fp16"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["loss_scale"] > 0 and r["skipped"] is False for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    cfg, _, _ = recipe.RunDir(runs["fp16"]).read_config()
    assert cfg.compute.mixed_precision == "fp16"  # and it ran in fp16: the scale was recorded


def test_an_inf_gradient_skips_the_step_and_sgd_sai_starts_at_the_next(concept, tiny_pipeline_dir,
                                                                      tmp_path):  # fmt: skip
    """One LoRA tensor's gradient made inf in the first backward: the GradScaler skips the step
    (no parameter moves, the scale halves, SGD-SaI has taken no g-SNR); the second step is
    SGD-SaI's first, its g-SNR read on the unscaled gradient."""
    run = setup_run(concept, tiny_pipeline_dir, tmp_path / "run", "mixed_precision=fp16", steps=3)
    name, victim = next((n, p) for n, p in run.trainable.items() if "lora_B" in n)
    handle = victim.register_hook(lambda g: torch.full_like(g, math.inf))
    before = {n: p.detach().clone() for n, p in run.trainable.items()}
    scale = run.accelerator.scaler.get_scale()
    recipe.train_step(run)
    handle.remove()
    record = recipe._record(run, 0.0)
    assert record["skipped"] is True and record["loss_scale"] == scale / 2
    assert all(torch.equal(before[n], p) for n, p in run.trainable.items())
    sgd_sai = run.optimizer.optimizer
    assert not any(r["initialised"] for r in sgd_sai.gsnr_table())
    recipe.train_step(run)
    assert recipe._record(run, 0.0)["skipped"] is False
    rows = {r["name"]: r for r in sgd_sai.gsnr_table({p: n for n, p in run.trainable.items()})}
    assert rows[name]["initialised"] and rows[name]["gsnr"] < 1e4  # unscaled: no 2**16 in it
    assert not torch.equal(before[name], victim)


def test_an_fp16_run_resumes_bitwise(concept, tiny_pipeline_dir, tmp_path):
    more = (*SETTINGS, "--set", "mixed_precision=fp16", "--set", "cache_latents=false",
            "--checkpoint-every", "2")  # fmt: skip
    whole = train_tiny(concept, tiny_pipeline_dir, tmp_path / "whole", "sgd-sai", *more, steps=4)
    cut = train_tiny(concept, tiny_pipeline_dir, tmp_path / "cut", "sgd-sai", *more, steps=2)
    (cut / "lora.safetensors").unlink()
    assert cli.train_main(["--resume", str(cut), "--max-steps", "4"]) == 0
    a, b = load_file(str(whole / "lora.safetensors")), load_file(str(cut / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ed_lora_trains_under_fp16(concept, tiny_pipeline_dir, tmp_path):
    out = train_tiny(concept, tiny_pipeline_dir, tmp_path / "run", "sgd-sai", *SETTINGS,
                     "--set", "edlora=true", "--set", "mixed_precision=fp16", steps=2)  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    vectors = load_file(str(out / "edlora.safetensors"))
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in vectors.values())
