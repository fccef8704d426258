"""sai-app end to end: a real ``sai-app`` process over two tiny trained runs, called through
gradio_client and driven by a real browser (Playwright + Debian's chromium), plus the pieces
of the app that translate widget values (seeds, the training command, error messages)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from sai_diffusion import cli
from sai_diffusion.compare.labels import group_runs, run_labels
from sai_diffusion.compare.views import run_cost
from sai_diffusion.errors import UserError
from sai_diffusion.files.lora_files import lora_numel
from sai_diffusion.files.run_dir import RunDir, index_runs
from tests.app.helpers import RUNS, http_get, serving

PROMPT = "a pencil sketch of <Vthing>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_BROWSER = (
    "no chromium on PATH (Debian: apt-get install chromium)"
    if CHROMIUM is None
    else "playwright is not installed (pip install -e '.[dev]')"
    if importlib.util.find_spec("playwright") is None
    else ""
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_compare_endpoint_returns_the_grid_png(server, runs_dir):
    """/compare (gradio_client) renders both runs with the same two seeds into one PNG:
    two rows of 64 px tiles under a title, beside a label column."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    path = client.predict(
        list(RUNS.values()), "a pencil sketch of <Vthing>", "1,2", 2, 7.5, 1.0, "",
        api_name="/compare",
    )  # fmt: skip
    image = Image.open(path)
    assert image.format == "PNG"
    width, height = image.size
    assert 2 * 64 < width < 2 * 64 + 300 and 2 * 64 < height < 2 * 64 + 300
    corner = image.crop((width - 64, height - 64, width, height))  # adamw, seed 2
    assert len(corner.getcolors(maxcolors=64 * 64)) > 100  # an image, not the white background

    # a folder name works as well as the key; a wrong name is one clear message
    assert Image.open(client.predict(["sgd-sai"], "a photo of {token}", "3", 1, 7.5, 0.7, "",
                                     api_name="/compare")).size[1] > 64  # fmt: skip
    with pytest.raises(Exception, match="No run 'nope'") as err:
        client.predict(["nope"], "a photo", "1", 1, 7.5, 1.0, "", api_name="/compare")
    assert "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="Seeds"):
        client.predict(["sgd-sai"], "a photo", "one", 1, 7.5, 1.0, "", api_name="/compare")


def test_only_files_under_the_runs_folder_are_served(server, runs_dir):
    """gradio's file route serves the runs folder (allowed_paths) and nothing else."""
    ok = runs_dir / "thing" / "sgd-sai" / "run.yaml"
    assert http_get(f"{server}/gradio_api/file={ok}") == 200
    for path in ("/etc/passwd", runs_dir.parent / "secret.txt", f"{runs_dir}/../secret.txt"):
        assert http_get(f"{server}/gradio_api/file={path}") in (403, 404), path
    assert http_get(f"{server}/file=/etc/passwd") in (403, 404)


def test_concurrent_compares_give_the_grids_of_the_same_calls_one_by_one(server):
    """Two /compare calls at once, one per run, each from its own client: each grid is pixel
    for pixel the grid the same call gives alone, so neither was drawn with the other run's
    LoRA or token vector. The runs' images differ, so a mix-up would show."""
    from gradio_client import Client

    def grid(run: str, start: threading.Barrier | None = None) -> Image.Image:
        client = Client(server, verbose=False)
        if start is not None:
            start.wait(timeout=60)
        path = client.predict([run], PROMPT, "1,2", 2, 7.5, 1.0, "", api_name="/compare")
        return Image.open(path).convert("RGB")

    runs = list(RUNS.values())
    alone = {run: grid(run) for run in runs}
    start = threading.Barrier(len(runs))
    with ThreadPoolExecutor(len(runs)) as pool:
        together = dict(zip(runs, pool.map(lambda run: grid(run, start), runs), strict=True))
    for run in runs:
        assert together[run].tobytes() == alone[run].tobytes(), run
    tiles = {  # the bottom row: the run's two 64 px images
        run: image.crop((image.width - 128, image.height - 64, image.width, image.height))
        for run, image in alone.items()
    }
    assert tiles[RUNS["sgd-sai"]].tobytes() != tiles[RUNS["adamw"]].tobytes()


@pytest.fixture(scope="module")
def spare(runs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second sai-app over a copy of ``runs/``, for tests that delete runs under it."""
    runs = tmp_path_factory.mktemp("spare") / "runs"
    shutil.copytree(runs_dir, runs, ignore=shutil.ignore_patterns("tensorboard"))
    with serving(runs) as url:
        yield url, runs


def test_compare_on_a_run_deleted_while_the_app_is_open_is_one_message(spare):
    """A run compared once (its model now cached), then its folder deleted: /compare on it
    answers one message that names the run and says to press Rescan, with no traceback in
    the answer or in the app's log; the app goes on comparing the other runs."""
    from gradio_client import Client

    url, runs = spare
    doomed = runs / "thing" / "doomed"
    shutil.copytree(runs / "thing" / "adamw", doomed)
    client = Client(url, verbose=False)
    settings = (PROMPT, "1", 2, 7.5, 1.0, "")
    assert Image.open(client.predict(["thing/doomed"], *settings, api_name="/compare")).size
    shutil.rmtree(doomed)
    with pytest.raises(Exception, match=r"'thing/doomed'.*Rescan") as err:
        client.predict(["thing/doomed"], *settings, api_name="/compare")
    assert "Traceback" not in str(err.value)
    assert Image.open(client.predict(["thing/sgd-sai"], *settings, api_name="/compare")).size
    assert "Traceback" not in (runs.parent / "sai-app.log").read_text()


def test_views_and_rescan_name_a_deleted_run_once(app_module, runs_dir, tmp_path):
    """The page's handlers, called here: the training views of runs one of which was deleted
    after the page listed it draw the other, with one warning that names the deleted run and
    says to press Rescan; Rescan takes it out of the list and the selection, saying so."""
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "thing", runs / "thing")
    app = app_module.CompareApp(runs)
    shutil.rmtree(runs / "thing" / "adamw")
    chosen, sgd_label = list(RUNS.values()), "thing · sgd-sai lr=0.05 · 2 steps"
    with pytest.warns(UserWarning, match=r"'thing/adamw'.*Rescan") as warned:
        _, loss, _, table, _, _ = app.show_runs(chosen, "", 0.9)
    assert len(warned) == 1
    assert [line.get_label() for line in loss.axes[0].lines][1::2] == [sgd_label]  # raw, EMA
    assert [row[0] for row in table.value["data"]] == [sgd_label]
    with pytest.warns(UserWarning, match=r"'thing/adamw'.*Rescan"):
        app.replot(chosen, 0.5)
    with pytest.warns(UserWarning, match=r"'thing/adamw'.*taken out") as warned:
        _, picked, _ = app.scan(None, chosen)
    assert len(warned) == 1 and picked.value == [RUNS["sgd-sai"]]


@pytest.mark.browser
@pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)
def test_browser_opens_ready_generates_and_shows_curves(server, runs_dir, tmp_path):
    """In chromium: the page opens with the newest concept's runs chosen and their first
    prompt; generate with 2 seeds: the grid and a gallery of 2 x 2 images appear, the grid is
    offered as a file, and the Training tab draws the loss, g-SNR and alignment plots, with
    the scores under their names."""
    from playwright.sync_api import sync_playwright

    labels = run_labels(index_runs(runs_dir))
    for key, (clip_t, clip_i) in zip(RUNS.values(), ((0.21, 0.64), (0.24, 0.58)), strict=True):
        (runs_dir / key / "eval.json").write_text(json.dumps({"clip_t": clip_t, "clip_i": clip_i,
                                                              "concept_fidelity": 0.5}))  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            page.wait_for_selector("#runs input")
            page.wait_for_function(
                "(document.querySelector('#prompt input')?.value || '').includes('<Vthing>')",
                timeout=20_000,
            )
            chosen = page.locator("#runs").inner_text()
            assert all(labels[key] in chosen for key in RUNS.values()), chosen
            assert "Traceback" not in page.content()
            page.fill("#seeds textarea, #seeds input", "1,2")
            page.fill("#steps input[type=number]", "2")
            page.press("#steps input[type=number]", "Enter")
            page.click("#generate")
            page.wait_for_selector("#gallery img", timeout=120_000)
            page.wait_for_selector("#grid-file a", timeout=10_000)
            assert page.locator("#gallery img").count() == 4
            assert page.locator("#grid img").count() == 1
            page.screenshot(path=str(tmp_path / "images.png"), full_page=True)

            page.get_by_role("tab", name="Training").click()
            page.wait_for_selector("#loss-plot img", timeout=20_000)
            page.wait_for_selector("#gsnr-plot img", timeout=20_000)
            page.wait_for_selector("#alignment-plot img", timeout=20_000)
            for header in ("text alignment (CLIP-T)", "image alignment (CLIP-I)",
                           "concept fidelity", "peak memory (MiB)", "waiting for data (s)"):  # fmt: skip
                assert header in page.content(), header
            page.screenshot(path=str(tmp_path / "training.png"), full_page=True)

            # the Train tab's fields reach the command preview as one settings mapping
            page.get_by_role("tab", name="Train a new run").click()
            page.fill("#train-max-steps textarea, #train-max-steps input", "7")
            page.press("#train-max-steps textarea, #train-max-steps input", "Tab")
            page.wait_for_function(
                "document.querySelector('#train-command').innerText.includes('--max-steps 7')",
                timeout=10_000,
            )
        finally:
            browser.close()
            for key in RUNS.values():  # the module's other tests see the runs unscored
                (runs_dir / key / "eval.json").unlink()
    assert Image.open(tmp_path / "images.png").size[0] == 1280


@pytest.mark.browser
@pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)
def test_browser_names_a_run_deleted_after_the_page_listed_it(spare, tmp_path):
    """In chromium, the page lists thing/gone, then its folder is deleted: picking it shows
    one message naming it and saying to press Rescan, never a traceback; Rescan takes it out
    of the list, saying so; the other run's training curves still draw."""
    from playwright.sync_api import sync_playwright

    url, runs = spare
    gone = runs / "thing" / "gone"
    shutil.copytree(runs / "thing" / "sgd-sai", gone)
    index = index_runs(runs)
    listed = run_labels(index)  # as the page lists them: "· thing/gone" tells the copies apart
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_text(f"{len(index)} runs").wait_for()  # the page's scan is done
            shutil.rmtree(gone)
            page.click("#runs input")
            option = '#runs li[data-testid="dropdown-option"][aria-label="{}"]'
            page.click(option.format(listed["thing/gone"]))
            page.keyboard.press("Escape")
            toast = page.locator(".toast-body", has_text="thing/gone")
            toast.wait_for(timeout=20_000)
            assert toast.count() == 1 and "Rescan" in toast.inner_text()
            page.get_by_role("button", name="Rescan").click()
            page.locator(".toast-body", has_text="taken out").wait_for(timeout=20_000)
            page.click("#runs input")
            options = page.locator('#runs li[data-testid="dropdown-option"]')
            options.first.wait_for()
            assert "thing/gone" not in " ".join(options.all_inner_texts())
            assert "Traceback" not in page.content()

            sgd = run_labels(index_runs(runs))["thing/sgd-sai"]  # "· thing/sgd-sai" is no more
            page.click(option.format(sgd))
            page.keyboard.press("Escape")
            page.get_by_role("tab", name="Training").click()
            page.wait_for_selector("#loss-plot img", timeout=20_000)
            page.screenshot(path=str(tmp_path / "gone.png"), full_page=True)
        finally:
            browser.close()


# ------------------------------------------------------------------ translation, no server
def test_seeds_are_parsed_or_refused_with_the_field_named(app_module):
    """Whole numbers in [0, 2**63), at most 16: a larger seed is one message (issue 30), not
    torch's overflow error after the model loaded."""
    assert app_module.parse_seeds("1,2, 3") == [1, 2, 3]
    assert app_module.parse_seeds("7 1-3 2") == [7, 1, 2, 3]
    assert app_module.parse_seeds(f"0 {2**63 - 1}") == [0, 2**63 - 1]
    for bad in ("", "a", "-1", "3-1", "1-100", "1.5", "0x10", str(2**63),
                "99999999999999999999999", f"{2**63 - 2}-{2**63}", "1 " * 1_000):  # fmt: skip
        with pytest.raises(UserError, match="Seeds"):
            app_module.parse_seeds(bad)


def test_train_tab_refuses_a_seed_no_generator_takes(app_module, tmp_path):
    """Issue 30: a seed outside [0, 2**63) or an lr that is not finite is one message in the
    Train tab, before any process starts; the largest seed passes."""
    from sai_diffusion_app import training

    def args(**fields: str) -> list[str]:
        return training.train_args(tmp_path, {"concept": "demo", "run_folder": "r", **fields})

    assert args(seed=str(2**63 - 1))[-4:-2] == ["--seed", str(2**63 - 1)]
    for seed in ("99999999999999999999999", str(2**63), "-1"):
        with pytest.raises(UserError, match=r"--seed .* 2\*\*63 - 1"):
            args(seed=seed)
    with pytest.raises(UserError, match="--seed must be a whole number, got '99999"):
        args(seed="9" * 5_000)  # more digits than int() reads
    for lr in ("nan", "inf", "-inf"):
        with pytest.raises(UserError, match="--lr must be a finite number"):
            args(lr=lr)


def test_train_tab_translates_fields_into_the_cli_command(app_module, tmp_path):
    """Empty fields leave the concept's settings alone; the run folder stays inside runs/."""
    from sai_diffusion_app import training

    runs = tmp_path.resolve()

    def form(**fields: str) -> dict[str, str]:  # the Train tab's fields, empty unless given
        return {name: fields.get(name, "") for name in training.TRAIN_FIELDS}

    args = training.train_args(
        runs, form(concept="potter", base_model="/m/sd15", optimizer="adamw", max_steps="800",
                   rank="8", seed="0", run_folder="p/a"),
    )  # fmt: skip
    assert args[1:] == [
        "--concept", "potter", "--base-model", "/m/sd15", "--optimizer", "adamw",
        "--max-steps", "800", "--rank", "8", "--seed", "0", "--output-dir", str(runs / "p/a"),
    ]  # fmt: skip
    assert Path(args[0]).name == "sai-train-lora"
    assert training.shown_command(args).startswith("sai-train-lora --concept potter ")
    with pytest.raises(UserError, match="inside"):
        training.train_args(runs, form(concept="potter", run_folder="../elsewhere"))
    with pytest.raises(UserError, match="--lr must be a finite number"):
        training.train_args(runs, form(concept="potter", lr="fast"))
    # no base model: the concept's own, else the built-in miniature model
    args = training.train_args(runs, {"concept": "demo", "base_model": " ", "run_folder": "d/a"})
    assert args[1:] == ["--concept", "demo", "--optimizer", "sgd-sai", "--output-dir",
                        str(runs / "d/a")]  # fmt: skip
    with pytest.raises(ValueError, match="max_step"):
        training.train_args(runs, {"concept": "demo", "max_step": "3"})  # a UI wiring bug


def test_handler_errors_reach_the_page_as_one_message(app_module, runs_dir):
    """UserError keeps its message; anything else becomes one line naming the terminal."""
    import gradio as gr

    with pytest.raises(UserError, match="Pick at least one run"):
        app_module.CompareApp(runs_dir).resolve([])

    @app_module.user_errors
    def refuse():
        raise UserError("runs on different base models cannot be compared")

    @app_module.user_errors
    def crash():
        raise KeyError("boom")

    with pytest.raises(gr.Error, match="different base models"):
        refuse()
    with pytest.raises(gr.Error, match="crash failed: KeyError.*terminal"):
        crash()


def test_training_from_the_page_only_on_loopback(app_module, runs_dir):
    """Served beyond this machine (--host 0.0.0.0), the page cannot start processes."""
    import gradio as gr

    def buttons(demo: gr.Blocks) -> set[str]:
        return {b.value for b in demo.blocks.values() if isinstance(b, gr.Button)}

    assert "Start training" in buttons(app_module.build_app(runs_dir, allow_training=True))
    assert "Start training" not in buttons(app_module.build_app(runs_dir, allow_training=False))
    assert app_module.is_loopback("127.0.0.1") and app_module.is_loopback("::1")
    assert not app_module.is_loopback("0.0.0.0") and not app_module.is_loopback("192.168.1.5")


def test_missing_runs_dir_exits_2_with_one_message(tmp_path, capsys):
    rc = cli._run(cli.app_main, ["--runs-dir", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "Traceback" not in err


def test_run_list_and_costs_from_the_trained_runs(runs_dir):
    """Only real runs are listed, labelled as in the picker; SGD-SaI's measured optimizer
    state is half of AdamW's (one buffer per weight against two)."""
    index = index_runs(runs_dir)
    assert sorted(index) == sorted(RUNS.values())
    labels = run_labels(index)
    assert labels["thing/sgd-sai"] == "thing · sgd-sai lr=0.05 · 2 steps"
    assert list(group_runs(index)) == ["thing · on pipeline"]
    sai = run_cost(runs_dir / "thing/sgd-sai", optimizer="sgd-sai")
    adamw = run_cost(runs_dir / "thing/adamw", optimizer="adamw")
    assert sai.state_source == adamw.state_source == "checkpoint"
    numel = lora_numel(runs_dir / "thing/adamw")
    assert adamw.state_bytes >= 2 * 4 * numel
    assert 0.45 < sai.state_bytes / adamw.state_bytes < 0.55
    assert sai.median_step_time > 0 and sai.steps_logged == 2


def test_the_loss_plot_draws_the_held_out_loss_of_the_run_that_has_one(app_module, runs_dir):
    index = index_runs(runs_dir)
    fig = app_module.loss_figure(index, list(RUNS.values()), run_labels(index), 0.9)
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    logged = [r for r in RunDir(runs_dir / RUNS["sgd-sai"]).read_metrics() if "val_loss" in r]
    assert len(dashed) == 1 and [r["step"] for r in logged] == [2]
    assert list(dashed[0].get_ydata()) == [r["val_loss"] for r in logged]
    assert "held out" in dashed[0].get_label() and "held-out" in fig.axes[0].get_title()
