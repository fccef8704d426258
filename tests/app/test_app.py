"""sai-app end to end: a real ``sai-app`` process over two tiny trained runs, called through
gradio_client and driven by a real browser (Playwright + Debian's chromium), plus the pieces
of the app that translate widget values (seeds, the training command, error messages)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from sai_diffusion import cli
from sai_diffusion.compare.labels import group_runs, run_labels
from sai_diffusion.compare.views import run_cost
from sai_diffusion.errors import UserError
from sai_diffusion.files.lora_files import lora_numel
from sai_diffusion.files.run_dir import index_runs
from tests.helpers import make_concept, train_tiny

RUNS = {"sgd-sai": "thing/sgd-sai", "adamw": "thing/adamw"}
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


@pytest.fixture(scope="module")
def runs_dir(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished tiny runs (sgd-sai, adamw; 2 steps at 64 px), a folder that is not a run
    and a run.yaml that does not parse, in ``runs/``; ``secret.txt`` lies beside ``runs/``."""
    root = tmp_path_factory.mktemp("app")
    concept = make_concept(root / "concept")
    runs = root / "runs"
    for optimizer, name in RUNS.items():
        train_tiny(concept, tiny_pipeline_dir, runs / name, optimizer,
                   "--set", "validation_seeds=[1]", "--set", "sample_steps=2")  # fmt: skip
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run")
    (runs / "broken").mkdir()
    (runs / "broken" / "run.yaml").write_text("config: [unclosed")
    (root / "secret.txt").write_text("outside the runs folder")
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def server(runs_dir: Path) -> str:
    """A real ``sai-app`` process on a free port; gradio's cache and temp files go under the
    test's folder. Stopped with Ctrl-C (SIGINT), as a user would."""
    port = _free_port()
    work = runs_dir.parent
    env = {**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio"), "TMPDIR": str(work)}
    log = (work / "sai-app.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sai_diffusion.cli import app_entry; app_entry()",
         "--runs-dir", str(runs_dir), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        assert proc.poll() is None, (work / "sai-app.log").read_text()
        try:
            if _get(url + "/") == 200:
                break
        except OSError:
            pass
        assert time.time() < deadline, "sai-app did not answer within 90 s"
        time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


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
    assert _get(f"{server}/gradio_api/file={ok}") == 200
    for path in ("/etc/passwd", runs_dir.parent / "secret.txt", f"{runs_dir}/../secret.txt"):
        assert _get(f"{server}/gradio_api/file={path}") in (403, 404), path
    assert _get(f"{server}/file=/etc/passwd") in (403, 404)


@pytest.mark.browser
@pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)
def test_browser_picks_runs_generates_and_shows_curves(server, runs_dir, tmp_path):
    """In chromium: generating with no run picked shows one error message; then pick both
    runs, generate with 2 seeds: the grid and a gallery of 2 x 2 images appear, the grid is
    offered as a file, and the Training tab draws the loss and g-SNR plots."""
    from playwright.sync_api import sync_playwright

    labels = run_labels(index_runs(runs_dir))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            page.wait_for_selector("#runs input")
            page.click("#generate")
            toast = page.wait_for_selector(".toast-body", timeout=10_000)
            assert "Pick at least one run" in toast.inner_text()
            assert "Traceback" not in page.content()
            for key in RUNS.values():
                page.click("#runs input")
                page.click(f'#runs li[data-testid="dropdown-option"][aria-label="{labels[key]}"]')
            page.keyboard.press("Escape")
            page.wait_for_function(
                "document.querySelector('#prompt input').value.includes('<Vthing>')"
            )
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
    assert Image.open(tmp_path / "images.png").size[0] == 1280


# ------------------------------------------------------------------ translation, no server
@pytest.fixture(scope="module")
def app_module():
    return cli.load_app()


def test_seeds_are_parsed_or_refused_with_the_field_named(app_module):
    assert app_module.parse_seeds("1,2, 3") == [1, 2, 3]
    assert app_module.parse_seeds("7 1-3 2") == [7, 1, 2, 3]
    for bad in ("", "a", "-1", "3-1", "1-100"):
        with pytest.raises(UserError, match="Seeds"):
            app_module.parse_seeds(bad)


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
    with pytest.raises(UserError, match="--lr must be a number"):
        training.train_args(runs, form(concept="potter", lr="fast"))
    # no base model: the concept's own, else the built-in miniature model
    args = training.train_args(runs, {"concept": "demo", "base_model": " ", "run_folder": "d/a"})
    assert args[1:] == ["--concept", "demo", "--optimizer", "sgd-sai", "--output-dir",
                        str(runs / "d/a")]  # fmt: skip
    with pytest.raises(ValueError, match="max_step"):
        training.train_args(runs, {"concept": "demo", "max_step": "3"})  # a UI wiring bug


def test_handler_errors_reach_the_page_as_one_message(app_module):
    """UserError keeps its message; anything else becomes one line naming the terminal."""
    import gradio as gr

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
