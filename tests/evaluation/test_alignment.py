"""CLIP-T, CLIP-I and DINO on real (tiny, random-weight) transformers models saved as folders:
the figures against hand computations, what the text tower reads, and sai-eval on a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sai_diffusion import cli
from sai_diffusion.errors import UserError
from sai_diffusion.evaluation.alignment import (
    AlignmentModels,
    AlignmentScorer,
    alignment_scores,
    all_pairs_mean,
)
from sai_diffusion.evaluation.evaluator import evaluate, training_images
from sai_diffusion.files.run_dir import RunDir
from tests.helpers import make_concept, train_tiny


@pytest.fixture(scope="module")
def models(scorer_dirs) -> AlignmentModels:
    return AlignmentModels.load(str(scorer_dirs[0]), str(scorer_dirs[1]))


def _images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        image = Image.new("RGB", (40, 36), (60 * i, 200 - 50 * i, 90))
        image.paste((255, 255, 255), (5 + 7 * i, 5, 20 + 5 * i, 30))
        out.append(image)
    return out


def test_identical_images_align_at_one(models):
    image = _images(1)
    for features in (models.clip_images, models.dino_images):
        assert all_pairs_mean(features(image), features(image)) == pytest.approx(1.0, abs=1e-6)


def test_the_all_pairs_mean_is_the_hand_computed_one_on_three_images(models):
    generated, references = _images(3), _images(3)[::-1][:2]
    for features in (models.clip_images, models.dino_images):
        a = [features([im])[0] for im in generated]
        b = [features([im])[0] for im in references]
        by_hand = sum(float(torch.dot(x, y) / (x.norm() * y.norm())) for x in a for y in b) / (
            len(a) * len(b)
        )
        assert all_pairs_mean(features(generated), features(references)) == pytest.approx(
            by_hand, abs=1e-5
        )


def test_the_text_tower_reads_the_class_word_not_the_concept_words(models):
    seen = []
    embeddings = models.clip.text_model.embeddings
    hook = embeddings.register_forward_hook(lambda m, args, kw, out: seen.append(
        kw.get("input_ids", args[0] if args else None)), with_kwargs=True)  # fmt: skip
    try:
        rows = [("a pencil sketch of {token}", _images(2), None)]
        report = alignment_scores(models, rows, _images(1), "dog")
    finally:
        hook.remove()
    texts = models.clip_processor.tokenizer.batch_decode(seen[0], skip_special_tokens=True)
    assert texts == ["a pencil sketch of dog"] * 2
    assert set(report) >= {"clip_t", "clip_t_mos", "clip_i", "dino"}
    assert report["clip_t_mos"] == pytest.approx(
        sum(2.5 * max(c, 0) for c in _cosines(models, _images(2), "a pencil sketch of dog")) / 2,
        abs=1e-4,
    )


def _cosines(models, images, text):
    a = models.clip_images(images)
    b = models.clip_texts([text] * len(images))
    return (a * b).sum(-1).tolist()


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    concept = make_concept(root / "concept")
    return train_tiny(concept, tiny_pipeline_dir, root / "run", "sgd-sai")


def test_sai_eval_scores_a_run_and_keeps_the_images_it_scored(
    tiny_run, scorer_dirs, models, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n# a comment\na pencil sketch of {token}\n")
    code = cli.eval_main([str(run), "--clip-model", str(scorer_dirs[0]), "--dino-model",
                          str(scorer_dirs[1]), "--prompts", str(prompts), "--seeds", "1", "2",
                          "--steps", "2"])  # fmt: skip
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(RunDir(run).scores.read_text())
    for key in (
        "clip_t",
        "clip_t_mos",
        "clip_i",
        "dino",
        "base_clip_t",
        "base_clip_i",
        "base_dino",
    ):
        assert key in line and key in report
    assert line["images"] == 4
    # the saved images are the ones scored: scoring them again gives the figures
    per_prompt = report["alignment"]["per_prompt"]
    _, concept, _ = RunDir(run).read_config()
    references = training_images(concept, RunDir(run))
    for i, entry in enumerate(per_prompt):
        kept = [Image.open(RunDir(run).eval_images() / f"p{i:02d}-s{s}.png").convert("RGB")
                for s in (1, 2)]  # fmt: skip
        again = all_pairs_mean(models.clip_images(kept), models.clip_images(references))
        assert again == pytest.approx(entry["clip_i"], abs=1e-4)
        base = [Image.open(RunDir(run).eval_images(base=True) / f"p{i:02d}-s{s}.png")
                for s in (1, 2)]  # fmt: skip
        assert len(base) == 2
    assert (RunDir(run).eval_images() / "prompts.txt").read_text().splitlines() == [
        "a photo of {token}", "a pencil sketch of {token}"]  # fmt: skip


def test_bad_scorer_inputs_exit_2_naming_what_to_pass(
    tiny_run, tiny_pipeline_dir, scorer_dirs, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    cases = [
        (["--clip-model", str(tiny_pipeline_dir / "text_encoder")], "not a CLIP model"),
        (["--clip-model", str(tiny_pipeline_dir / "unet")], "--clip-model DIR"),
        (["--clip-model", str(scorer_dirs[0]), "--dino-model", str(scorer_dirs[0])], "not a DINO"),
        (["--clip-model", str(scorer_dirs[0]), "--prompts", "nothere.txt"], "nothere.txt"),
    ]
    for extra, says in cases:
        assert cli._run(cli.eval_main, [str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    import huggingface_hub.constants  # no hub here: offline at once instead of retrying

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli._run(cli.eval_main, [str(run), "--dino-model", "none"]) == 2
    assert "--clip-model" in capsys.readouterr().err
    # a run whose training images are gone
    _, concept, _ = RunDir(run).read_config()
    shutil.rmtree(concept.data)
    with pytest.raises(UserError, match="training images"):
        evaluate(run, [AlignmentScorer(AlignmentModels.load(str(scorer_dirs[0]), None))],
                 seeds=[1], steps=2)  # fmt: skip


@pytest.mark.slow  # the sweep script with its worker: ~20 s
def test_the_quality_sweep_runs_on_a_concept_outside_the_miniature(
    tiny_pipeline_dir, scorer_dirs, tmp_path
):
    import subprocess
    import sys

    concept = make_concept(tmp_path / "concept")
    out = tmp_path / "sweep"
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_quality.py"
    cmd = [sys.executable, str(script), "--concept", str(concept), "--base-model",
           str(tiny_pipeline_dir), "--clip-model", str(scorer_dirs[0]), "--dino-model",
           str(scorer_dirs[1]), "--optimizers", "sgd-sai,adamw", "--lrs", "0.05", "--seeds", "0",
           "--steps", "2", "--eval-seeds", "0", "--workers", "1", "--out", str(out),
           "--set", "resolution=64", "--set", "validation_seeds=[]"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["optimizer"] for r in results) == ["adamw", "sgd-sai"]
    assert all(-1 <= r[m] <= 1 for r in results for m in ("clip_t", "clip_i", "dino"))
    table = (out / "results.md").read_text()
    for head in ("Peak CLIP-T", "Avg CLIP-I", "Peak DINO", "base model (no LoRA)"):
        assert head in table, head
    assert (out / "quality.png").stat().st_size > 10_000
    assert set(json.loads((out / "base.json").read_text())) == {"clip_t", "clip_i", "dino",
                                                                 "eval_seeds"}  # fmt: skip
