"""sai-app: trained LoRA runs side by side in the browser.

    sai-app --runs-dir runs/          # http://127.0.0.1:7860

UI only. Like LLaMA-Factory's web UI it is a translator: widget values become the arguments
of the library's functions (``compare.Comparer`` for the grid and its images,
``compare.labels`` for the run picker, ``compare.views`` for curves, g-SNR and costs, the
``sai-train-lora`` command line for a new run) and nothing here re-implements them.

Safe by default: it binds 127.0.0.1, answers only requests addressed to this machine and
sent by its own pages (``hosts``), serves files from the runs folder only (plus gradio's
cache of the images it generated), bounds what one comparison may ask for, sends no
analytics, and shows errors as one message.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import functools
import inspect
import itertools
import logging
import math
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from sai_diffusion.compare import SEED_LIMIT, Comparer, RunInfo
from sai_diffusion.compare.labels import group_runs, run_labels
from sai_diffusion.config import available_concepts
from sai_diffusion.errors import UserError
from sai_diffusion.files.run_dir import EVAL_FILE, GSNR_FILE, METRICS_FILE, RUN_FILE, index_runs
from sai_diffusion.fsutil import atomic_path
from sai_diffusion.optim import OPTIMIZERS

from .hosts import HostCheck, is_loopback
from .training import TRAIN_FIELDS, TrainingJob, short, shown_command, train_args
from .views import (
    COST_HEADERS,
    alignment_figure,
    cost_table,
    gsnr_figure,
    loss_figure,
    sample_gallery,
)

log = logging.getLogger("sai_app")

ALL_RUNS = "all runs"
MAX_SEEDS = 16
MAX_TEXT = 1_000  # characters of a prompt or the seeds field
LORA_WEIGHTS = [("0 (base UNet)", 0.0), ("0.7", 0.7), ("1.0", 1.0)]  # Mix-of-Show's comparison
CSS = ".sai-note {opacity: 0.8; font-size: 0.9em}"


# ------------------------------------------------------------------------------ handlers
def user_errors(fn: Callable) -> Callable:
    """Show bad input as the library's own message and anything else as one line naming the
    terminal, never a stack trace in the page."""

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, UserError):
            return gr.Error(str(exc), print_exception=False)
        log.error("sai-app: %s failed", fn.__name__, exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        return gr.Error(
            f"{fn.__name__.replace('_', ' ')} failed: {type(exc).__name__}: {first} "
            "(the terminal running sai-app has the details)",
            print_exception=False,
        )

    # gradio tells generators (streamed output) from functions by inspection: keep the kind
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - see translate
                raise translate(exc) from None

        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see translate
            raise translate(exc) from None

    return wrapper


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"``, ``"1 2 3"`` or ``"1-4"`` -> seeds, in order, each once.

    Raises:
        UserError: not whole numbers in [0, 2**63), none, more than ``MAX_SEEDS``, or more
            than ``MAX_TEXT`` characters.
    """
    text = str(text)
    if len(text) > MAX_TEXT:
        raise UserError(f"Seeds: at most {MAX_TEXT:,} characters, got {len(text):,}.")
    seeds: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise UserError(
                f"Seeds: {short(part)} is not a seed; write whole numbers like 1,2,3 or 1-4."
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi >= SEED_LIMIT:
            raise UserError(
                f"Seeds: {short(part)} is too large; a seed is a whole number from 0 to 2**63 - 1."
            )
        if hi < lo or hi - lo >= MAX_SEEDS:
            raise UserError(f"Seeds: the range {part} is empty or too long.")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    if not seeds:
        raise UserError("Seeds: give at least one, e.g. 1,2,3.")
    if len(seeds) > MAX_SEEDS:
        raise UserError(f"Seeds: at most {MAX_SEEDS} per comparison, got {len(seeds)}.")
    return seeds


def one_line(text: str | None, what: str) -> str:
    """A prompt field's text, stripped.

    Raises:
        UserError: a line break, or more than ``MAX_TEXT`` characters (each line would be a
            line of the grid's title, and the text model reads 77 tokens anyway).
    """
    text = str(text or "")
    if len(text) > MAX_TEXT:
        raise UserError(f"{what}: at most {MAX_TEXT:,} characters, got {len(text):,}.")
    text = text.strip()
    if len(text.splitlines()) > 1:
        raise UserError(f"{what}: write it on one line; this one has a line break.")
    return text


def number(value: Any, what: str) -> float:
    """A slider's value as a finite float (the API may send anything).

    Raises:
        UserError: not a number, NaN or infinite.
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise UserError(f"{what} must be a finite number, got {short(str(value))}.")
    return x


class ComparerCache:
    """Comparers by run set, the most recent ``size`` kept: each holds a base model, so a
    second click on the same runs costs no loading. A run whose LoRA file changed (it was
    still training) gets a fresh one."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Comparer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, runs: list[RunInfo], *, device: str | None) -> Comparer:
        key = tuple(sorted((str(r.path), _mtime(r.files.lora)) for r in runs))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            # drop before loading: two base models at once may not fit
            while len(self._items) >= self.size:
                self._items.popitem(last=False)
            comparer = Comparer(sorted(runs, key=lambda r: str(r.path)), device=device)
            self._items[key] = comparer
            return comparer


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class CompareApp:
    """The handlers, over one runs folder; the Blocks layout is in ``build_app``."""

    def __init__(self, runs_dir: Path, *, device: str | None = None) -> None:
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.device = device
        self.comparers = ComparerCache()
        self._tmp = tempfile.TemporaryDirectory(prefix="sai-app-")  # grids; gradio copies them
        self.grid_dir = Path(self._tmp.name)
        self._count = itertools.count(1)
        self.training: TrainingJob | None = None

    # -- the run list
    def index(self) -> dict[str, RunInfo]:
        return index_runs(self.runs_dir)

    def resolve(self, keys: list[str] | str | None) -> list[RunInfo]:
        """Run keys (``concept/folder``) or unique folder names -> runs, in the given order.

        Raises:
            UserError: none given, or a name that is not a run here.
        """
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        if not keys:
            raise UserError("Pick at least one run to compare.")
        index = self.index()
        by_name: dict[str, list[str]] = {}
        for key, info in index.items():
            by_name.setdefault(info.name, []).append(key)
        runs = []
        for key in keys:
            if key not in index and len(by_name.get(key, [])) == 1:
                key = by_name[key][0]
            if key not in index:
                known = ", ".join(sorted(index)) or "(none)"
                raise UserError(
                    f"{self.missing([key])} Press Rescan to refresh the list; runs there: {known}."
                )
            if index[key] not in runs:
                runs.append(index[key])
        return runs

    def missing(self, keys: list[str]) -> str:
        """How a message on chosen runs that are not here starts: the page lists the runs as
        they were at its last scan, and a folder may have been deleted since."""
        return (
            f"No run {_quoted(keys)} under {self.runs_dir}: deleted or moved since the list "
            "was loaded?"
        )

    def present(self, selected: list[str] | None, index: dict[str, RunInfo]) -> list[str]:
        """The chosen runs that are in ``index``; one warning names the others, which the
        training views leave out."""
        selected = list(selected or [])
        if gone := [k for k in selected if k not in index]:
            gr.Warning(
                f"{self.missing(gone)} The training views leave {'them' if gone[1:] else 'it'} "
                "out; press Rescan to refresh the list."
            )
        return [k for k in selected if k in index]

    @user_errors
    def scan(self, group: str | None, selected: list[str] | None):
        """Page load and Rescan: the groups and the runs of the chosen one."""
        index = self.index()
        groups = group_runs(index)
        choices = _group_choices(groups)
        if group not in choices:
            group = next(iter(groups), ALL_RUNS)
        unfinished = sum(not info.has_lora for info in index.values())
        status = (
            f"**{len(index)} run{'s' * (len(index) != 1)}** in `{self.runs_dir}`"
            + (f" ({unfinished} unfinished)" if unfinished else "")
            if index
            else f"No runs in `{self.runs_dir}` yet: train one with `sai-train-lora "
            f"--output-dir {self.runs_dir}/...` (or the Train tab) and press Rescan."
        )
        return (
            gr.Dropdown(choices=choices, value=group),
            self.pick_group(group, selected, index),
            status,
        )

    @user_errors
    def pick_group(self, group: str | None, selected: list[str] | None, index=None):
        """The runs of ``group`` to pick from; the chosen ones of it stay chosen, and a chosen
        run whose folder is gone is taken out, saying so."""
        index = index if index is not None else self.index()
        if gone := [k for k in selected or [] if k not in index]:
            gr.Warning(
                f"No run {_quoted(gone)} under {self.runs_dir} any more: taken out of the list."
            )
        labels = run_labels(index)
        groups = group_runs(index)
        keys = groups.get(group, list(index)) if group != ALL_RUNS else list(index)
        keep = [k for k in selected or [] if k in keys]
        # multiselect again: an update without it reads the list as one value (and warns)
        return gr.Dropdown(choices=[(labels[k], k) for k in keys], value=keep, multiselect=True)

    # -- prompts and training views for the chosen runs
    @user_errors
    def show_runs(self, selected: list[str] | None, prompt: str, smoothing: float):
        index = self.index()
        keys = self.present(selected, index)
        labels = run_labels(index)
        prompts = _prompts([index[k] for k in keys])
        offered = {  # what an earlier choice of runs put there; the user's own text stays
            q
            for info in index.values()
            for p in info.validation_prompts
            for q in (p, p.replace(info.token, "{token}"))
        }
        if prompts and (not prompt or prompt in offered):
            prompt = prompts[0]
        return (
            gr.Dropdown(choices=prompts, value=prompt),
            loss_figure(index, keys, labels, smoothing),
            gsnr_figure(index, keys, labels),
            cost_table(index, keys, labels),
            alignment_figure(index, keys, labels),
            sample_gallery(index, keys, labels),
        )

    @user_errors
    def replot(self, selected: list[str] | None, smoothing: float):
        index = self.index()
        keys = self.present(selected, index)
        return loss_figure(index, keys, run_labels(index), smoothing)

    # -- images
    @user_errors
    def compare(
        self,
        runs: list[str],
        prompt: str,
        seeds: str,
        steps: float,
        guidance: float,
        lora_weight: float,
        negative_prompt: str,
        with_base: bool = False,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio's injection idiom
    ) -> tuple[str, dict[str, Any]]:
        """Generate every chosen run with the same prompt, seeds and settings; return the grid
        PNG's path (the API's answer) and the gallery's items."""
        prompt = one_line(prompt, "Prompt")
        if not prompt:
            raise UserError("Write a prompt; {token} becomes each run's concept token.")
        negative_prompt = one_line(negative_prompt, "Negative prompt")
        seed_list = parse_seeds(seeds)
        steps, guidance = int(number(steps, "Sampling steps")), number(guidance, "Guidance")
        lora_weight = number(lora_weight, "LoRA weight")
        chosen = self.resolve(runs)
        progress(0, desc=f"loading the base model and {len(chosen)} LoRA(s)")
        comparer = self.comparers.get(chosen, device=self.device)

        def report(done: int, total: int) -> None:
            progress(done / total, desc=f"image {done} of {total}")

        settings = f"LoRA weight {lora_weight:g}, {steps} steps, cfg {guidance:g}"
        shown = comparer.compare(
            prompt,
            seed_list,
            title=f"{prompt}  ({settings})",
            order=[r.path for r in chosen],  # the cached comparer orders runs by path
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt or None,
            lora_weight=lora_weight,
            progress=report,
            with_base=bool(with_base),
        )
        path = self.grid_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{next(self._count)}.png"
        with atomic_path(path) as tmp:
            shown.grid.save(tmp, format="PNG")
        return str(path), {"grid": str(path), "items": shown.items(), "columns": len(seed_list)}

    # -- training (a subprocess of the CLI)
    def train_command(self, settings: dict[str, str]) -> str:
        return shown_command(train_args(self.runs_dir, settings))

    @user_errors
    def start_training(self, settings: dict[str, str]) -> Iterator[tuple[str, str]]:
        if self.training is not None and self.training.running:
            raise UserError(
                f"A run is already training ({self.training.run_dir}); wait for it or stop it."
            )
        args = train_args(self.runs_dir, settings)
        self.training = job = TrainingJob(args, Path(args[args.index("--output-dir") + 1]))
        yield shown_command(args), "starting..."
        while job.running:
            time.sleep(1.0)
            yield shown_command(args), job.status()
        yield shown_command(args), job.status()

    @user_errors
    def stop_training(self) -> str:
        if self.training is None or not self.training.running:
            return "No run is training."
        self.training.stop()
        return f"Stopped; continue it with sai-train-lora --resume {self.training.run_dir}"


def newest_group(index: dict[str, RunInfo], groups: dict[str, list[str]]) -> str | None:
    """The group (concept and base model) of the most recently started run."""
    if not groups:
        return None
    started = {k: _mtime(info.files.run_yaml) for k, info in index.items()}
    return max(groups, key=lambda g: max(started[k] for k in groups[g]))


def _quoted(keys: list[str]) -> str:
    return ", ".join(f"'{k}'" for k in keys)


def _group_choices(groups: dict[str, list[str]]) -> list[str]:
    """The group picker: every concept and base model, and "all runs" when there are two."""
    return [ALL_RUNS, *groups] if len(groups) > 1 else list(groups) or [ALL_RUNS]


def _prompts(runs: list[RunInfo]) -> list[str]:
    """The runs' validation prompts, token filled when they share one token, else ``{token}``
    (which the comparer fills per run)."""
    tokens = {r.token for r in runs}
    out: list[str] = []
    for r in runs:
        for p in r.validation_prompts:
            p = p if len(tokens) == 1 else p.replace(r.token, "{token}")
            if p not in out:
                out.append(p)
    return out


# -------------------------------------------------------------------------------- layout
def build_app(
    runs_dir: Path, *, device: str | None = None, allow_training: bool = True
) -> gr.Blocks:
    """The page: run picker, then tabs for images, training views, and a new run (that one
    only with ``allow_training``)."""
    app = CompareApp(runs_dir, device=device)
    index = app.index()
    groups = group_runs(index)
    # ready to compare: the newest concept's finished runs (their first prompt follows)
    first_group = newest_group(index, groups) or ALL_RUNS
    chosen = [k for k in groups.get(first_group, []) if index[k].has_lora]

    with gr.Blocks(title="sai-diffusion: side by side", analytics_enabled=False) as demo:
        gr.Markdown("## sai-diffusion · side by side")
        status = gr.Markdown()
        with gr.Row(equal_height=True):
            group = gr.Dropdown(
                choices=_group_choices(groups),
                value=first_group,
                label="Concept · base model",
                scale=1,
            )
            labels = run_labels(index)
            runs = gr.Dropdown(
                choices=[(labels[k], k) for k in groups.get(first_group, list(index))],
                value=chosen,
                multiselect=True,
                allow_custom_value=True,  # the API may name runs made after start; checked
                label="Runs",
                info="Pick the runs to compare; a LoRA only means something on its base model.",
                scale=4,
                elem_id="runs",
            )
            rescan = gr.Button("Rescan", scale=0, min_width=90)

        with gr.Tab("Images"):
            with gr.Row():
                prompt = gr.Dropdown(
                    choices=[],
                    value="",
                    allow_custom_value=True,
                    label="Prompt",
                    info="The runs' validation prompts, or your own; {token} becomes each run's token.",
                    scale=3,
                    elem_id="prompt",
                )
                negative = gr.Textbox(label="Negative prompt", scale=2)
            with gr.Row():
                seeds = gr.Textbox(
                    value="1,2,3", label="Seeds", info="e.g. 1,2,3 or 1-4", scale=1, elem_id="seeds"
                )
                steps = gr.Slider(
                    1, 100, value=25, step=1, label="Sampling steps", scale=2, elem_id="steps"
                )
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", scale=2)
                weight = gr.Radio(LORA_WEIGHTS, value=1.0, label="LoRA weight", scale=2)
                with_base = gr.Checkbox(
                    label="Add the base model (no LoRA, token read as the class word)", scale=2
                )
            generate = gr.Button("Generate side by side", variant="primary", elem_id="generate")
            grid_view = gr.Image(
                label="Side by side: one row per run, one column per seed",
                type="filepath",
                interactive=False,
                elem_id="grid",
            )
            grid_file = gr.File(label="Download the grid (PNG)", elem_id="grid-file")
            gallery = gr.Gallery(
                label="Each image (click to enlarge)",
                columns=6,
                object_fit="contain",
                elem_id="gallery",
            )
            shown = gr.State()

        with gr.Tab("Training"):
            smoothing = gr.Slider(0, 0.99, value=0.9, step=0.01, label="Loss smoothing (EMA)")
            loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
            table = gr.Dataframe(headers=COST_HEADERS, label="Cost and scores", wrap=True)
            gr.Markdown(
                f"Median step time and peak memory come from `{METRICS_FILE}`; optimizer "
                "state is measured in the last checkpoint (est.: from the LoRA size). Score "
                f"columns come from `{EVAL_FILE}` when the run has been scored.",
                elem_classes="sai-note",
            )
            alignment_plot = gr.Plot(
                label="Concept against prompt (sai-eval --clip-model: CLIP-I against CLIP-T)",
                elem_id="alignment-plot",
            )
            gsnr_plot = gr.Plot(
                label=f"SGD-SaI g-SNR scale per block ({GSNR_FILE})", elem_id="gsnr-plot"
            )
            samples = gr.Gallery(label="Validation samples at the end of training", columns=4)

        with gr.Tab("Train a new run"):
            trained = _train_tab(app) if allow_training else None
            if trained is None:
                gr.Markdown(
                    "Training from the page is off because the app is served beyond this "
                    "machine; run `sai-train-lora` in a terminal, or start `sai-app` with "
                    "the default `--host 127.0.0.1`."
                )

        # -- events
        picked = [runs, prompt, smoothing]
        views = [prompt, loss_plot, gsnr_plot, table, alignment_plot, samples]
        for trigger in (demo.load, rescan.click):
            trigger(app.scan, [group, runs], [group, runs, status], api_visibility="private").then(
                app.show_runs, picked, views, api_visibility="private"
            )
        if trained is not None:  # a finished (or stopped) run joins the list
            trained.then(app.scan, [group, runs], [group, runs, status], api_visibility="private")
        group.input(app.pick_group, [group, runs], runs, api_visibility="private")
        runs.change(app.show_runs, picked, views, api_visibility="private")
        smoothing.release(app.replot, [runs, smoothing], loss_plot, api_visibility="private")
        generate.click(
            app.compare,
            [runs, prompt, seeds, steps, guidance, weight, negative, with_base],
            [grid_file, shown],
            api_name="compare",
            concurrency_limit=1,  # one base model on the device at a time
        ).success(_show_images, shown, [grid_view, gallery], api_visibility="private")

    return demo


def _train_tab(app: CompareApp):
    """Fields -> the ``sai-train-lora`` command (shown live), run as a child process. Returns
    the start event. The fields reach the handlers as one settings mapping (``TRAIN_FIELDS``
    names), the shape ``training.train_args`` takes."""
    gr.Markdown(
        "Starts `sai-train-lora` as a separate process with the command shown; the run "
        f"is written under the runs folder and appears above once it has a `{RUN_FILE}`.",
        elem_classes="sai-note",
    )
    default = "concept's default"
    first = next(iter(app.index().values()), None)  # the newest habits are a good start
    concepts = available_concepts()
    with gr.Row():
        t_concept = gr.Dropdown(
            concepts,
            value=first.concept if first and first.concept in concepts else "demo",
            label="Concept",
            allow_custom_value=True,
            info="a shipped concept or a path to your YAML",
        )
        t_base = gr.Textbox(
            value=(first.base_model or "") if first else "",
            label="Base model",
            placeholder="empty: the concept's, else the built-in miniature model",
            info="diffusers folder, .safetensors or hub id",
        )
        t_opt = gr.Dropdown(list(OPTIMIZERS), value="sgd-sai", label="Optimizer")
        t_lr = gr.Textbox(label="Learning rate", placeholder=default)
    with gr.Row():
        t_steps = gr.Textbox(label="Max steps", placeholder=default, elem_id="train-max-steps")
        t_res = gr.Textbox(label="Resolution", placeholder=default)
        t_rank = gr.Textbox(label="Rank", placeholder=default)
        t_seed = gr.Textbox(label="Seed", placeholder=default)
        t_name = gr.Textbox(
            label="Run folder", placeholder="inside the runs folder; empty: concept/optimizer-time"
        )
    widgets = [t_concept, t_base, t_opt, t_lr, t_steps, t_res, t_rank, t_seed, t_name]
    fields = dict(zip(TRAIN_FIELDS, widgets, strict=True))

    def settings(values: dict) -> dict[str, str]:  # gradio passes {component: value}
        return {name: values[widget] for name, widget in fields.items()}

    @_safe
    def preview(values: dict) -> str:
        return app.train_command(settings(values))

    def start(values: dict) -> Iterator[tuple[str, str]]:
        yield from app.start_training(settings(values))

    t_command = gr.Code(
        value=preview({widget: widget.value for widget in widgets}),
        label="Equivalent command",
        language="shell",
        interactive=False,
        elem_id="train-command",
    )
    with gr.Row():
        t_start = gr.Button("Start training", variant="primary")
        t_stop = gr.Button("Stop")
    t_log = gr.Textbox(label="Progress", lines=6, interactive=False)

    for widget in widgets:
        widget.change(preview, set(widgets), t_command, api_visibility="private")
    started = t_start.click(
        start, set(widgets), [t_command, t_log], api_visibility="private", concurrency_limit=1
    )
    t_stop.click(app.stop_training, None, t_log, api_visibility="private")
    return started


def _show_images(shown: dict[str, Any] | None):
    """After /compare: the grid, and the single images in rows of the seed count."""
    shown = shown or {"grid": None, "items": [], "columns": 3}
    return shown["grid"], gr.Gallery(value=shown["items"], columns=shown["columns"])


def _safe(fn: Callable[..., str]) -> Callable[..., str]:
    """For the live command preview: an incomplete form shows what is missing."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as exc:
            return f"# {exc}"

    return wrapper


def launch(
    runs_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> gr.Blocks:
    """Serve the app; blocks until Ctrl-C unless ``prevent_thread_lock``.

    Only ``runs_dir`` is added to gradio's allowed paths: the page can fetch the runs' own
    images, and nothing else on the disk (gradio also serves the images it generated, from
    its cache folder). Starting training runs from the page is offered on a loopback
    ``host`` only. A request addressed to a name that is not this machine's (``Host``) or
    sent by another site's page (``Origin``) gets 400 before gradio sees it: see
    ``hosts.HostCheck`` for the rule; ``allowed_hosts`` are more names to answer.
    """
    runs_dir = Path(runs_dir).expanduser().resolve()
    demo = build_app(runs_dir, device=device, allow_training=is_loopback(host))
    # gradio adds its compression and CORS middlewares around this one: they answer a CORS
    # preflight (OPTIONS) themselves but reach no route, so every route sits behind the check
    host_check = Middleware(HostCheck, host=host, extra=tuple(allowed_hosts))
    demo.launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(runs_dir)],
        show_error=True,  # messages only: every handler turns exceptions into gr.Error
        prevent_thread_lock=prevent_thread_lock,
        share=False,
        ssr_mode=False,
        max_file_size="1mb",  # the app takes no uploads
        css=CSS,
        quiet=quiet,
        app_kwargs={"middleware": [host_check]},  # FastAPI(middleware=...)
    )
    return demo
