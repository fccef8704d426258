"""sai-compare: several runs on one base model, side by side (tiny model, CPU).

Two real 2-step runs of one concept (sgd-sai; adamw with text-encoder LoRA) are trained once
for the module; variants of them (another base model, another token, another embedding, an
unfinished run) are copies with one file edited.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from sai_diffusion import cli
from sai_diffusion.compare import (
    BASE_ROW,
    Comparer,
    find_runs,
    grid_layout,
    load_run_info,
    make_grid,
    row_labels,
)
from sai_diffusion.errors import UserError
from sai_diffusion.models.base import load_base_model
from sai_diffusion.models.sampling import SampleSettings, generate, sampling_pipeline
from tests.helpers import make_concept, train_tiny

PROMPT = "a pencil sketch of {token}"
SEEDS = [1, 2, 3]
SAMPLE = {"steps": 2, "resolution": 64}  # 2 sampler steps: seconds, not minutes


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    concept = make_concept(root / "concept")
    extras = {
        "sgd-sai": [],
        # a large lr so that 2 steps move the images visibly
        "adamw": ["--lr", "0.01", "--set", "text_encoder_lora=true"],
    }
    out = {}
    for optimizer, extra in extras.items():
        out[optimizer] = train_tiny(concept, tiny_pipeline_dir, root / "runs" / optimizer, optimizer,
                                    "--set", "validation_seeds=[]", *extra)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def comparer(runs) -> Comparer:
    return Comparer([load_run_info(runs["sgd-sai"]), load_run_info(runs["adamw"])])


def copy_run(src: Path, dst: Path, **edits) -> Path:
    """A copy of a run folder with run.yaml entries changed: ``key=value`` for top-level
    entries, ``concept__key=value`` for the concept's."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    data = yaml.safe_load((dst / "run.yaml").read_text())
    for key, value in edits.items():
        section, _, name = key.rpartition("__")
        (data[section] if section else data)[name] = value
    (dst / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def test_grid_has_one_labelled_tile_per_run_and_seed(comparer):
    """Rows: each run, then the base model; columns: the seeds. The grid is the tiles at the
    sampling size plus a label column and a header, and the tiles are the images as made."""
    shown = comparer.compare(PROMPT, SEEDS, with_base=True, **SAMPLE)
    images, labels, grid = shown.rows, shown.labels, shown.grid
    assert list(images) == ["sgd-sai", "adamw", BASE_ROW]
    assert all(im.size == (64, 64) for row in images.values() for im in row)
    assert labels == row_labels(comparer.runs, with_base=True)
    assert labels["sgd-sai"] == "sgd-sai\nlr 0.05\n2 steps" and labels["adamw"].startswith("adamw")
    columns = [f"seed {s}" for s in SEEDS]
    # the heading is the prompt the images were drawn from, the runs' token in it
    assert shown.title == "a pencil sketch of <Vthing>"
    assert pixels(grid) == pixels(make_grid(images, row_labels=labels, col_labels=columns,
                                            title=shown.title))  # fmt: skip
    layout = grid_layout(images, row_labels=labels, col_labels=columns, title=shown.title)
    assert layout.left > 0 and layout.top > 0  # room for the labels
    assert grid.size == (layout.left + 3 * 64, layout.top + 3 * 64)
    for i, row in enumerate(images.values()):
        for j, image in enumerate(row):
            x, y = layout.left + 64 * j, layout.top + 64 * i
            assert pixels(grid.crop((x, y, x + 64, y + 64))) == pixels(image)
    # each row is its own model: the two runs differ from each other and from the base
    rows = {name: [pixels(im) for im in row] for name, row in images.items()}
    assert rows["sgd-sai"] != rows["adamw"]
    assert rows["sgd-sai"] != rows[BASE_ROW] and rows["adamw"] != rows[BASE_ROW]
    assert len(set(rows["sgd-sai"])) == 3  # and each seed its own image
    captions = [caption for _, caption in shown.items()]
    assert captions[0] == "sgd-sai · lr 0.05 · 2 steps · seed 1" and len(captions) == 9
    assert captions[-1] == "base model · (no LoRA) · seed 3"


def test_compare_shows_the_runs_in_the_order_asked(comparer, runs):
    shown = comparer.compare(PROMPT, [1], order=[runs["adamw"], runs["sgd-sai"]], with_base=True,
                             title="picked", **SAMPLE)  # fmt: skip
    assert list(shown.rows) == ["adamw", "sgd-sai", BASE_ROW]
    plain = comparer.compare(PROMPT, [1], with_base=True, title="plain", **SAMPLE)
    assert pixels(shown.rows["adamw"][0]) == pixels(plain.rows["adamw"][0])
    assert shown.grid.size[1] == plain.grid.size[1]  # the same one-line title band


def test_same_settings_give_the_same_images_whatever_the_order(comparer, runs):
    """Switching adapters and token rows leaves nothing behind: a second call, and a fresh
    Comparer loading the runs in the other order, give the same pixels for each run."""
    first = comparer.generate(PROMPT, SEEDS[:2], **SAMPLE)
    again = comparer.generate(PROMPT, SEEDS[:2], **SAMPLE)
    reverse = Comparer([load_run_info(runs["adamw"]), load_run_info(runs["sgd-sai"])])
    other = reverse.generate(PROMPT, SEEDS[:2], **SAMPLE)
    assert list(other) == ["adamw", "sgd-sai"]
    for name in ("sgd-sai", "adamw"):
        assert [pixels(i) for i in first[name]] == [pixels(i) for i in again[name]]
        assert [pixels(i) for i in first[name]] == [pixels(i) for i in other[name]]


def test_threads_sharing_a_comparer_get_the_images_each_gets_alone(comparer):
    """Two generate calls at once on one Comparer (two app requests on a cached one), with
    different seeds and LoRA weights: each gets the pixels it gets alone. The lock holds a
    run's adapter, weight and token vector through its images, so the other call cannot
    switch them mid-image."""
    calls = [
        {"seeds": [1, 2], "lora_weight": 1.0},
        {"seeds": [3], "lora_weight": 0.5, "with_base": True},
    ]
    alone = [comparer.generate(PROMPT, **call, **SAMPLE) for call in calls]
    start = threading.Barrier(len(calls))

    def at_once(call: dict) -> dict[str, list[Image.Image]]:
        start.wait(timeout=60)
        return comparer.generate(PROMPT, **call, **SAMPLE)

    for _ in range(3):  # a few tries at interleaving; each is well under a second
        with ThreadPoolExecutor(len(calls)) as pool:
            together = list(pool.map(at_once, calls))
        for got, want in zip(together, alone, strict=True):
            assert {n: [pixels(i) for i in row] for n, row in got.items()} == {
                n: [pixels(i) for i in row] for n, row in want.items()
            }


def test_lora_weight_zero_is_the_base_model_pixel_for_pixel(comparer, runs, tiny_pipeline_dir):
    """Weight 0 gives the base model plus the token, and the base row the base model with the
    class word, each equal to a separately loaded base pipeline sampled the same way."""
    images = comparer.generate(PROMPT, SEEDS[:2], lora_weight=0.0, with_base=True, **SAMPLE)

    def reference(prompt: str, token_file: Path | None) -> list[bytes]:
        base = load_base_model(tiny_pipeline_dir)
        if token_file is not None:
            base.load_textual_inversion(str(token_file), token="<Vthing>")
        pipe = sampling_pipeline(base)
        settings = SampleSettings(steps=2, negative_prompt=None, height=64, width=64)
        return [pixels(generate(pipe, prompt, seed, settings)) for seed in SEEDS[:2]]

    # without train_embeddings both runs keep the token's initial vector: one reference
    sgd, adamw = (load_file(str(runs[k] / "embeddings.safetensors")) for k in ("sgd-sai", "adamw"))
    assert torch.equal(sgd["<Vthing>"], adamw["<Vthing>"])
    with_token = reference(
        "a pencil sketch of <Vthing>", runs["sgd-sai"] / "embeddings.safetensors"
    )
    assert [pixels(i) for i in images["sgd-sai"]] == with_token
    assert [pixels(i) for i in images["adamw"]] == with_token
    assert [pixels(i) for i in images[BASE_ROW]] == reference("a pencil sketch of dog", None)


def test_each_run_gets_its_own_token_vector(runs, tmp_path):
    """Runs of one concept share the token name but not its vector: the token is added once
    and its row rewritten per run. A run of another concept adds its own token."""
    sgd = runs["sgd-sai"]
    retrained = copy_run(sgd, tmp_path / "retrained")  # same token, another vector
    vectors = load_file(str(sgd / "embeddings.safetensors"))
    save_file({"<Vthing>": vectors["<Vthing>"] * 3}, str(retrained / "embeddings.safetensors"),
              metadata={"tokens": '["<Vthing>"]'})  # fmt: skip
    renamed = copy_run(sgd, tmp_path / "renamed", concept__token="<Vother>", concept__name="other")
    save_file({"<Vother>": vectors["<Vthing>"]}, str(renamed / "embeddings.safetensors"),
              metadata={"tokens": '["<Vother>"]'})  # fmt: skip

    comparer = Comparer([load_run_info(p) for p in (sgd, retrained, renamed)])
    vocab = comparer.pipe.tokenizer.get_vocab()
    assert "<Vthing>" in vocab and "<Vother>" in vocab
    images = comparer.generate(PROMPT, [1], **SAMPLE)
    assert pixels(images["retrained"][0]) != pixels(images["sgd-sai"][0])
    # another token name with the same vector and LoRA: the same image
    assert pixels(images["renamed"][0]) == pixels(images["sgd-sai"][0])
    assert row_labels(comparer.runs)["renamed"].startswith("other\n")  # mixed concepts named

    size = len(comparer.pipe.tokenizer)
    with comparer.active("retrained") as pipe:
        row = pipe.text_encoder.get_input_embeddings().weight[vocab["<Vthing>"]]
        assert torch.equal(row, vectors["<Vthing>"][0] * 3)
        assert len(pipe.tokenizer) == size  # no second <Vthing>


def test_cli_writes_the_grid_and_a_report_with_settings_and_scores(runs, tmp_path, capsys):
    """One block per prompt, stacked; the HTML names each run's optimizer, lr and scores."""
    (runs["adamw"] / "eval.json").write_text('{"clip_score": 0.3125, "identity": 0.75}')
    out = tmp_path / "out" / "grid.png"
    prompts = ["a photo of {token}", "a sketch of {token}"]
    rc = cli.compare_main(
        [str(runs["sgd-sai"]), str(runs["adamw"]), "--prompt", prompts[0], "--prompt", prompts[1],
         "--seeds", "1", "2", "--steps", "2", "--with-base", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".html"))]

    grid = Image.open(out)
    tiles = {k: [Image.new("RGB", (64, 64))] * 2 for k in ("sgd-sai", "adamw", BASE_ROW)}
    labels = row_labels([load_run_info(runs[k]) for k in ("sgd-sai", "adamw")], with_base=True)
    block = grid_layout(tiles, row_labels=labels, col_labels=["seed 1", "seed 2"], title="x")
    assert block.size == (block.left + 2 * 64, block.top + 3 * 64)
    assert grid.size == (block.size[0], 2 * block.size[1])  # two one-line prompts

    report = out.with_suffix(".html").read_text()
    for text in ("sgd-sai", "0.05", "adamw", "0.01", "clip_score", "0.3125", "0.75",
                 "sha256-quick:", "&lt;Vthing&gt;", 'src="grid.png"', *prompts):  # fmt: skip
        assert text in report, text


def test_runs_on_different_base_models_are_refused(runs, tmp_path):
    """A real `sai-compare` process: exit code 2, one line naming both runs, no traceback,
    before any model is loaded."""
    other = copy_run(runs["adamw"], tmp_path / "other-base", base_model_hash="sha256:0123",
                     config__base_model="/models/realisticVision.safetensors")  # fmt: skip
    script = Path(sys.executable).parent / "sai-compare"
    command = [str(script)] if script.is_file() else [
        sys.executable, "-c", "from sai_diffusion.cli import compare_entry; compare_entry()"
    ]  # fmt: skip
    proc = subprocess.run(
        [*command, str(runs["sgd-sai"]), str(other), "--prompt", "x", "--out", str(tmp_path / "g.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "different base models" in errors[0]
    assert "sgd-sai" in errors[0] and "other-base" in errors[0]
    assert not (tmp_path / "g.png").exists()


def test_folders_that_are_not_finished_runs(runs, tmp_path, capsys):
    """find_runs lists runs (unfinished ones with has_lora False) and ignores the rest;
    load_run_info, Comparer and the CLI refuse them with one clear message."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(runs["sgd-sai"], root / "done")
    unfinished = copy_run(runs["adamw"], root / "unfinished")
    (unfinished / "lora.safetensors").unlink()
    (root / "junk").mkdir()
    (root / "junk" / "run.yaml").write_text("config: [not, a, mapping")
    (root / "pictures").mkdir()
    (root / "pictures" / "a.png").write_bytes(b"")

    found = {r.name: r for r in find_runs(root)}
    assert sorted(found) == ["done", "unfinished"]
    assert found["done"].has_lora and found["done"].steps == 2
    assert not found["unfinished"].has_lora and found["unfinished"].steps == 2  # from metrics
    assert found["done"].validation_prompts == [
        "a photo of <Vthing>",
        "a pencil sketch of <Vthing>",
    ]

    with pytest.raises(UserError, match="not a run directory"):
        load_run_info(root / "pictures")
    with pytest.raises(UserError, match="has not finished"):
        Comparer([found["done"], found["unfinished"]])
    rc = cli._run(cli.compare_main, [str(root / "pictures"), "--prompt", "x", "--out",
                                     str(tmp_path / "g.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "pictures" in err


def test_small_images_are_shown_enlarged_pixel_for_pixel():
    """32 px tiles (the miniature world) are drawn at 64 px by nearest neighbour, so the
    labels fit beside them and each generated pixel becomes a 2 x 2 block."""
    tile = Image.new("RGB", (32, 32), (10, 20, 30))
    tile.putpixel((5, 7), (250, 0, 0))
    rows = {"a": [tile, tile], "b": [tile, tile]}
    labels = {"a": "sgd-sai\nlr 0.03\n600 steps", "b": "base"}
    layout = grid_layout(rows, row_labels=labels, col_labels=["s1", "s2"])
    assert (layout.tile_w, layout.tile_h) == (64, 64)
    grid = make_grid(rows, row_labels=labels, col_labels=["s1", "s2"])
    assert grid.size == layout.size
    x, y = layout.left + 64, layout.top + 64  # row b, column 2
    block = [grid.getpixel((x + 2 * 5 + dx, y + 2 * 7 + dy)) for dx in (0, 1) for dy in (0, 1)]
    assert block == [(250, 0, 0)] * 4
    assert grid.getpixel((x + 2 * 5 + 2, y + 2 * 7)) == (10, 20, 30)


def test_a_dora_run_with_text_encoder_lora_draws_as_load_run_loads_it(tiny_pipeline_dir, tmp_path):
    """diffusers leaves the text encoder's DoRA magnitudes at their initial values; the
    comparer restores them, so its images are those of the run's files loaded whole."""
    from sai_diffusion.models.inference import load_run

    run = train_tiny(make_concept(tmp_path / "c"), tiny_pipeline_dir, tmp_path / "dora", "adamw",
                     "--lr", "0.01", "--set", "validation_seeds=[]", "--set", "use_dora=true",
                     "--set", "text_encoder_lora=true")  # fmt: skip
    images = Comparer([load_run_info(run)]).generate(PROMPT, SEEDS[:1], **SAMPLE)
    pipe = load_base_model(tiny_pipeline_dir)
    load_run(pipe, run)
    settings = SampleSettings(steps=2, negative_prompt=None, height=64, width=64)
    prompt = PROMPT.format(token="<Vthing>")
    want = pixels(generate(sampling_pipeline(pipe), prompt, SEEDS[0], settings))
    assert [pixels(i) for i in images["dora"]] == [want]
    # and the magnitudes matter here: stock diffusers alone draws another image
    stock = load_base_model(tiny_pipeline_dir)
    stock.load_textual_inversion(str(run / "embeddings.safetensors"), token="<Vthing>")
    stock.load_lora_weights(run, weight_name="lora.safetensors")
    assert pixels(generate(sampling_pipeline(stock), prompt, SEEDS[0], settings)) != want
