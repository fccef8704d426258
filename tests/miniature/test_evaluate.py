"""The built-in demo end to end: the shipped miniature model as the default base model, the
demo concept, ``sai-eval`` and its scoring.

The CLIs run as real processes on the shipped weights (configs/miniature) and the shipped
judge; the scoring rules are checked on rendered world images, whose content is known.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sai_diffusion import cli as cli_module
from sai_diffusion import config
from sai_diffusion.errors import UserError
from sai_diffusion.evaluation import evaluator
from sai_diffusion.evaluation.evaluator import evaluate, headline
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.miniature import miniature_dir, world
from sai_diffusion.miniature.concept import judged_object
from sai_diffusion.miniature.evaluate import HEADLINE, SHAPE_HEADLINE, score_images, scorers_for
from sai_diffusion.miniature.judge import Judge
from sai_diffusion.miniature.model import generate_images
from sai_diffusion.models.base import load_base_model
from sai_diffusion.models.sampling import generate_batch
from tests.helpers import make_concept, train_tiny

REPO = Path(__file__).resolve().parents[2]


def cli(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an installed entry point (or its module function) as its own process."""
    script = Path(sys.executable).parent / name
    entry = {"sai-train-lora": "train_entry", "sai-eval": "eval_entry"}[name]
    command = [str(script)] if script.is_file() else [
        sys.executable, "-c", f"from sai_diffusion.cli import {entry}; {entry}()"
    ]  # fmt: skip
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """``sai-train-lora --concept demo`` with no --base-model: 6 steps, in a real process."""
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = cli("sai-train-lora", "--concept", "demo", "--max-steps", "6", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------ the shipped base model
def test_the_miniature_model_is_shipped_under_25_mb_with_the_record_of_these_weights():
    """pretrain.json describes the weights beside it: their parameter counts, their latent
    scale and the object they never saw (its judge scores are measured in the next test)."""
    folder = miniature_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024
    record = json.loads((folder / "pretrain.json").read_text(encoding="utf-8"))
    assert record["command"].startswith("python scripts/pretrain_world.py")
    pipe = load_base_model(folder)
    counts = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in record["parameters"]
    }
    assert counts == record["parameters"] and set(counts) == {"unet", "vae", "text_encoder"}
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae_scaling_factor"])
    assert record["held_out_object"] == world.HELD_OUT


def test_the_shipped_model_draws_what_it_is_asked_and_not_the_held_out_object(judge):
    """The judge reads a few prompts of the shipped model: the object, colour and background
    asked for come out, and "heart", never seen in pretraining, does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_base_model("miniature")
        seeds = [0, 1, 2, 3]
        asked = [world.Scene("star", "red", "white"), world.Scene("moon", "yellow", "black"),
                 world.Scene("square", "blue", "dots")]  # fmt: skip
        right = 0
        for scene in asked:
            verdicts = judge.predict(generate_images(pipe, world.caption(scene), seeds))
            right += sum(v["object"] == scene.object and v["colour"] == scene.colour
                         and v["background"] == scene.background for v in verdicts)  # fmt: skip
        hearts = judge.predict(generate_images(pipe, "a photo of a red heart", seeds))
    finally:
        torch.set_num_threads(threads)
    assert right >= 0.6 * len(asked) * len(seeds)
    assert sum(v["object"] == "heart" for v in hearts) <= 1


def test_miniature_is_the_default_base_model_and_the_name_resolves():
    assert config.TrainConfig().base.model == "miniature"
    cfg, concept = config.resolve("demo", {}, [])
    assert cfg.base.model == "miniature" and cfg.resolution == 32
    assert concept.evaluation["object"] == world.HELD_OUT


# ------------------------------------------------------------------ the demo, end to end
@pytest.mark.slow  # the demo run (a module fixture) and a real sai-eval process: ~20 s
def test_demo_trains_without_a_base_model_and_evaluates(demo_run):
    saved = yaml.safe_load((demo_run / "run.yaml").read_text(encoding="utf-8"))
    assert saved["config"]["base"]["model"] == "miniature"
    assert (demo_run / "lora.safetensors").is_file()

    proc = cli("sai-eval", str(demo_run), "--seeds", "0", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    for key in (*HEADLINE, *SHAPE_HEADLINE):
        assert 0.0 <= line[key] <= 1.0, key
    assert line["prompt_fidelity"] <= line["concept_fidelity"]
    assert line["object"] == "heart" and line["concept"] == "demo"
    n_prompts = len(config.load_concept("demo").evaluation["prompts"])
    assert line["images"] == 2 * n_prompts

    saved = json.loads((demo_run / "eval.json").read_text(encoding="utf-8"))
    assert {k: saved[k] for k in HEADLINE} == {k: line[k] for k in HEADLINE}
    assert len(saved["per_prompt"]) == n_prompts
    plain = [p for p in saved["per_prompt"] if p["run"]["shape_iou"] is not None]
    assert saved["shape_images"] == 2 * len(plain) and len(plain) == 4  # white, black, blue
    sketch = next(p for p in saved["per_prompt"] if "sketch" in p["prompt"])
    assert sketch["asks"] == {"colour": None, "background": None, "style": world.SKETCH}
    assert len(sketch["run"]["judged"]) == len(sketch["base"]["judged"]) == 2


@pytest.mark.slow  # two evaluations of the demo run: ~10 s
def test_eval_is_deterministic_and_can_skip_the_base_model(demo_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = evaluate_run(demo_run, seeds=[3], with_base=False, write=False)
        again = evaluate_run(demo_run, seeds=[3], with_base=False, write=False)
    finally:
        torch.set_num_threads(threads)
    assert first["per_prompt"] == again["per_prompt"]
    assert first["base_concept_fidelity"] is None and first["images"] == len(first["per_prompt"])
    assert "base" not in first["per_prompt"][0]


@pytest.mark.slow  # four evaluations of the demo run: ~13 s
def test_runs_on_one_base_model_share_its_images(demo_run, monkeypatch):
    """sai-eval RUN_DIR... generates the base model's images once, and scores them the same."""
    prompts_generated = []

    def counting(pipe, prompt, *args, **kwargs):  # the real generator, counted
        prompts_generated.append(prompt)
        return generate_batch(pipe, prompt, *args, **kwargs)

    monkeypatch.setattr(evaluator, "generate_batch", counting)
    n_prompts = len(config.load_concept("demo").evaluation["prompts"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uncached = evaluate_run(demo_run, seeds=[5], write=False)
        assert len(prompts_generated) == 2 * n_prompts  # the run's and the base model's
        cache: dict = {}
        first = evaluate_run(demo_run, seeds=[5], write=False, base_cache=cache)
        second = evaluate_run(demo_run, seeds=[5], write=False, base_cache=cache)
        other_seed = evaluate_run(demo_run, seeds=[6], write=False, base_cache=cache)
    finally:
        torch.set_num_threads(threads)
    # 2 x n for the first cached call, n for the second, 2 x n again for a new seed
    assert len(prompts_generated) == 2 * n_prompts + 2 * n_prompts + n_prompts + 2 * n_prompts
    token = config.load_concept("demo").token
    assert sum(token not in p for p in prompts_generated) == 3 * n_prompts  # base prompts
    assert len(cache) == 2 and all(len(images) == n_prompts for images in cache.values())
    for report in (first, second):
        assert report["per_prompt"] == uncached["per_prompt"]
        assert report["base_concept_fidelity"] == uncached["base_concept_fidelity"]
    assert other_seed["settings"]["seeds"] == [6] and "base" in other_seed["per_prompt"][0]


@pytest.mark.slow  # a training and a real sai-eval process: ~14 s
def test_eval_of_a_real_concept_offline_without_models_and_of_a_non_run_exit_2(
    tmp_path, tiny_pipeline_dir, capsys, monkeypatch
):
    """A concept outside the miniature world is scored by CLIP / DINO; with no network and no
    local model folder, sai-eval says what to pass."""
    run = train_tiny(make_concept(tmp_path), tiny_pipeline_dir, tmp_path / "run", "sgd-sai")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as offline users set it: no retries
    proc = cli("sai-eval", str(run))  # a real process: exit code 2, one line, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "openai/clip-vit-base-patch32" in errors[0]
    assert "pass --clip-model DIR" in errors[0]

    assert cli_module._run(cli_module.eval_main, [str(tmp_path)]) == 2
    assert "run.yaml" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists() and not (run / "eval.json").exists()


# ------------------------------------------------------------------ scoring rules
def _renders(obj: str, colour: str | None, background: str | None, n: int = 3):
    style = world.SKETCH if colour is None else world.PHOTO
    scene = world.Scene(obj, colour, background, style)
    rng = np.random.default_rng(7)
    return [world.render(scene, size=32, rng=rng) for _ in range(n)]


def test_scores_count_the_concept_and_what_the_prompt_asked(judge):
    rows = [
        # asked yellow on grass: drawn right (3), then a red heart on white (3 wrong colour)
        ("a photo of a yellow {token} on grass", _renders("heart", "yellow", "grass"),
         _renders("star", "yellow", "grass")),
        ("a photo of a yellow {token} on grass", _renders("heart", "red", "white"),
         _renders("heart", "yellow", "grass")),
        # a sketch asked, a sketch of the heart drawn
        ("a pencil sketch of {token}", _renders("heart", None, None),
         _renders("circle", None, None)),
    ]  # fmt: skip
    report = score_images(judge, "heart", rows)
    assert report["images"] == 9
    assert report["concept_fidelity"] == 1.0
    assert report["prompt_fidelity"] == round(6 / 9, 4)
    assert report["base_concept_fidelity"] == round(3 / 9, 4)
    assert report["base_prompt_fidelity"] == round(3 / 9, 4)
    assert [p["run"]["prompt_fidelity"] for p in report["per_prompt"]] == [1.0, 0.0, 1.0]
    # grass and a sketch: no shape is measured
    assert report["shape_images"] == 0
    assert all(report[key] is None for key in SHAPE_HEADLINE)
    assert all(p["run"]["shape_iou"] is None for p in report["per_prompt"])


def test_shapes_are_fitted_on_plain_backgrounds_against_the_object_and_the_class(judge):
    """The world's hearts fit the heart, its circles the circle (test_shape.py measures how
    well); an image with nothing drawn scores 0; a textured background is not measured."""
    empty = [world.render_empty("blue", 32, np.random.default_rng(s)) for s in range(3)]
    rows = [
        ("a photo of a red {token} on a white background", _renders("heart", "red", "white"),
         _renders("circle", "red", "white")),
        ("a green {token} on a black background", _renders("heart", "green", "black"), None),
        ("a photo of a red {token} on a blue background", empty, None),
        ("a photo of a yellow {token} on grass", _renders("heart", "yellow", "grass"), None),
    ]  # fmt: skip
    report = score_images(judge, "heart", rows, class_object="circle")
    assert report["shape_images"] == 9 and report["images"] == 12
    for key in SHAPE_HEADLINE:
        assert 0.0 <= report[key] <= 1.0, key
    run = [p["run"] for p in report["per_prompt"]]
    assert min(run[0]["shape_iou"], run[1]["shape_iou"]) >= 0.9
    assert max(run[0]["class_shape_iou"], run[1]["class_shape_iou"]) <= 0.8
    assert run[2]["shape_iou"] == run[2]["class_shape_iou"] == 0.0
    assert run[3]["shape_iou"] is None and run[3]["class_shape_iou"] is None
    assert report["shape_iou"] == pytest.approx(
        (3 * run[0]["shape_iou"] + 3 * run[1]["shape_iou"]) / 9, abs=1e-4
    )
    assert report["base_class_shape_iou"] >= 0.9 and report["base_shape_iou"] <= 0.8
    # every world heart reads as a heart, no empty image and no world circle does
    assert run[0]["shape_share"] == run[1]["shape_share"] == 1.0 and run[2]["shape_share"] == 0.0
    assert report["shape_share"] == pytest.approx(6 / 9, abs=1e-4)
    assert report["base_shape_share"] == 0.0
    unmeasured = score_images(judge, "heart", rows[:1], shapes=False)  # the class-word rows
    assert unmeasured["shape_iou"] is None and unmeasured["shape_images"] == 0


def test_without_base_images_the_base_scores_are_none(judge):
    rows = [("a photo of {token}", _renders("heart", "blue", "white"), None)]
    report = score_images(judge, "heart", rows)
    assert report["base_concept_fidelity"] is None and report["concept_fidelity"] == 1.0


def test_prompt_asks_reads_colour_background_and_style():
    asks = world.prompt_asks
    assert asks("a photo of a yellow {token} on grass", "{token}") == {
        "colour": "yellow", "background": "grass", "style": world.PHOTO}  # fmt: skip
    assert asks("an orange <V> on a dotted background", "<V>") == {
        "colour": "orange", "background": "dots", "style": None}  # fmt: skip
    assert asks("a pencil sketch of <V>", "<V>") == {
        "colour": None, "background": None, "style": world.SKETCH}  # fmt: skip
    # a colour word elsewhere is not the object's colour
    assert asks("a photo of a <V> on a blue background", "<V>")["colour"] is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"object": 3, "prompts": ["a {token}"]}, "evaluation.object must be the name"),
        ({"object": "heart", "prompts": ["a photo"]}, "with {token}"),
        ({"object": "heart", "prompts": ["a {token}"], "seed": [1]}, "did you mean 'seeds'"),
        ({"object": "heart", "prompts": ["a {token}"], "seeds": []}, "seeds must be"),
        ({"object": "heart", "prompts": ["a {token}"], "steps": 0}, "steps must be"),
    ],
)
def test_a_bad_evaluation_section_names_the_file_and_the_fix(tmp_path, section, message):
    path = make_concept(tmp_path)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "evaluation": section}))
    with pytest.raises(UserError, match=message) as info:
        config.load_concept(str(path))
    assert str(path) in str(info.value)


def test_an_object_the_world_lacks_is_refused_before_training(tmp_path, capsys):
    """The settings check the section's shape; the miniature package checks the object, and
    sai-train-lora asks it before any model loads (exit 2, no run folder)."""
    path = make_concept(tmp_path)
    data = yaml.safe_load(path.read_text())
    path.write_text(
        yaml.safe_dump({**data, "evaluation": {"object": "unicorn", "prompts": ["a {token}"]}})
    )
    concept = config.load_concept(str(path))  # a name is all the settings know
    with pytest.raises(UserError, match="evaluation.object must name") as info:
        judged_object(concept)
    assert str(path) in str(info.value) and "heart" in str(info.value)

    out = tmp_path / "run"
    code = cli_module._run(
        cli_module.train_main, ["--concept", str(path), "--output-dir", str(out)]
    )
    assert code == 2 and "unicorn" in capsys.readouterr().err and not out.exists()


def test_quality_benchmark_refuses_bad_settings_before_any_run(tmp_path):
    """An unknown optimizer, or a concept the judge cannot score, ends the sweep at once."""
    script = str(REPO / "scripts" / "bench_quality.py")
    proc = subprocess.run([sys.executable, script, "--optimizers", "sgd-sai,adam", "--out",
                           str(tmp_path / "b")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "unknown ['adam']" in proc.stderr
    assert not (tmp_path / "b").exists()
    proc = subprocess.run([sys.executable, script, "--concept", "potter", "--out",
                           str(tmp_path / "b")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "no evaluation section naming a world object" in proc.stderr
    proc = subprocess.run([sys.executable, script, "--optimizers", "sgd-sai", "--lrs-for",
                           "adamw=1e-3", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--lrs-for 'adamw=1e-3': write OPTIMIZER=LR" in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # the benchmark script twice, with its worker pool: ~20 s
def test_quality_benchmark_writes_its_table_and_plot_and_resumes(tmp_path):
    """scripts/bench_quality.py at its smallest: one optimizer, two lrs (its own grid, which
    replaces --lrs), one seed, 2 steps."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_quality.py"), "--optimizers", "sgd-sai",
           "--lrs", "0.5", "--lrs-for", "sgd-sai=0.1,1", "--seeds", "0", "--steps", "2", "--eval-seeds", "0", "--workers", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["optimizer"], r["lr"], r["seed"]) for r in results) == [
        ("sgd-sai", 0.1, 0), ("sgd-sai", 1.0, 0)]  # fmt: skip
    figures = ("concept_fidelity", "prompt_fidelity", "shape_iou", "class_shape_iou",
               "shape_share")  # fmt: skip
    assert all(0 <= r[f] <= 1 for r in results for f in figures) and results[0]["steps"] == 2
    table = (out / "results.md").read_text()
    assert "| sgd-sai |" in table and "base model (no LoRA)" in table and "Peak concept" in table
    assert "Peak shape IoU" in table and "Peak shape share" in table
    assert "class-shape" not in table  # recorded, not ranked
    assert (out / "quality.png").stat().st_size > 10_000
    base = json.loads((out / "base.json").read_text())
    assert set(base) == {*figures, "eval_seeds"} and base["eval_seeds"] == [0]

    # a line from before the shape figures existed is scored again, without training
    lines = (out / "results.jsonl").read_text().splitlines()
    old = {k: v for k, v in json.loads(lines[0]).items() if k not in figures[2:]}
    (out / "results.jsonl").write_text("\n".join([json.dumps(old), *lines[1:]]) + "\n")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 runs to train, 1 to score again (2 already in" in again.stdout
    rescored = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rescored == results  # the same figures, and the other line untouched


@pytest.mark.slow  # an evaluation with CLIP and DINO: ~10 s
def test_a_miniature_run_gains_the_clip_figures_when_a_clip_model_is_given(
    demo_run, scorer_dirs, tmp_path
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, symlinks=True)
    code = cli_module.eval_main([str(run), "--seeds", "0", "--clip-model", str(scorer_dirs[0]),
                                 "--dino-model", str(scorer_dirs[1])])  # fmt: skip
    assert code == 0
    report = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    for key in (*HEADLINE, "clip_t", "clip_i", "dino", "base_clip_t", "base_dino"):
        assert isinstance(report[key], float), key
    assert report["alignment"]["text"] == "the prompt with {token} read as 'heart'"
    assert len(list((run / "eval").glob("p*-s0.png"))) == len(report["per_prompt"])


@pytest.mark.slow  # the demo run judged with the class word too: ~15 s
def test_class_fidelity_judges_the_prompts_with_the_class_word(demo_run, capsys):
    """The demo's class word is "circle": the base model draws circles when asked for them
    and no hearts, so its class figure is far above its concept figure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scorers = _scorers(demo_run, class_fidelity=True)
        report = evaluate(demo_run, scorers, seeds=[3, 4], write=False)
    finally:
        torch.set_num_threads(threads)
    assert report["class_object"] == "circle"
    assert report["base_class_fidelity"] >= 0.5 > report["base_concept_fidelity"]
    assert 0 <= report["class_prompt_fidelity"] <= report["class_fidelity"] <= 1
    assert {"class_fidelity", "base_class_fidelity"} <= set(headline(report, scorers))
    # the judge's own prompts only: another prompt set is refused with one line
    assert cli_module._run(cli_module.eval_main, [str(demo_run), "--class-fidelity",
                                                  "--prompts", "person"]) == 2  # fmt: skip
    assert "--class-fidelity" in capsys.readouterr().err


def _scorers(run: Path, **kwargs) -> list:
    """The scorers sai-eval picks for a run (the judge, for the demo)."""
    _, concept, _ = RunDir(run).read_config()
    return scorers_for(concept, **kwargs)


def evaluate_run(run: Path, **kwargs) -> dict:
    """``evaluate`` with the run's scorers, as sai-eval calls it."""
    return evaluate(run, _scorers(run), **kwargs)
