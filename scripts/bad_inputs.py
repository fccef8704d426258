"""Every bad input we know of, given to the real command-line tools: the exit code, the line the
user sees, and whether a traceback leaked out. docs/bad-inputs.md is this script's table.

    python scripts/bad_inputs.py                                # run them all, print a summary
    python scripts/bad_inputs.py --write docs/bad-inputs.md
    python scripts/bad_inputs.py --check docs/bad-inputs.md     # exit 1 when the table is stale

Each case is built from scratch in its own folder DIR/<name>/ (DIR: a temporary folder, written
``DIR`` in the table so that it reads the same on every machine) and runs there as one process
of an installed entry point, two at a time, one torch thread each. A case that needs a trained
run copies DIR/fixture/run, a 2-step run of the built-in miniature model with a checkpoint after
each step, trained first by the same ``sai-train-lora``. tests/test_bad_inputs.py runs this
once and holds every case to its expectation (``Outcome.problems``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXIT_USER_ERROR = 2  # sai_diffusion.errors.EXIT_USER_ERROR, the code every case expects
TIMEOUT_S = 300  # per process; a wrongly accepted input trains 1 step at 32 px, not 500 at 512
WORKERS = 2  # processes at a time: the tests' machine has 2 cores
# one line of ours (cli._run: "error: ...") or of argparse ("sai-train-lora: error: ...")
ERROR_LINE = re.compile(r"(?:[\w-]+: )?error: ")
TRACEBACK = "Traceback (most recent call last)"
ENTRY_POINTS = {
    "sai-train-lora": "train_entry",
    "sai-sample": "sample_entry",
    "sai-eval": "eval_entry",
    "sai-compare": "compare_entry",
    "sai-export": "export_entry",
    "sai-app": "app_entry",
}
PROMPT = "a photo of {token}"


# ------------------------------------------------------------------------- building the files
def write_concept(folder: Path, *, images: int | None = 2, **changes) -> Path:
    """``thing.yaml`` and its data folder ``data/`` (``images`` 32 px PNGs with captions; None:
    no folder): a good concept, one step at 32 px, or one with ``changes`` (None drops a key)."""
    data = folder / "data"
    if images is not None:
        data.mkdir(parents=True, exist_ok=True)
    for i in range(images or 0):
        Image.new("RGB", (32, 32), (60 * i, 200 - 50 * i, 90)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo of <TOK> number {i}", encoding="utf-8")
    entry = {
        "token": "<Vthing>",
        "class_word": "dog",
        "data": "data",
        "train": {"max_steps": 1, "resolution": 32},  # cheap, should a bad input get through
    }
    for key, value in changes.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    path = folder / "thing.yaml"
    path.write_text(yaml.safe_dump(entry, sort_keys=False), encoding="utf-8")
    return path


def junk(path: Path, size: int = 512) -> None:
    """``size`` random bytes (the same on every run) under a name that promises a format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(0).randbytes(size))


def copy_run(fixture: Path, to: Path, *, finished: bool = True) -> Path:
    """A copy of the fixture run; ``finished=False`` leaves what a killed run leaves: settings,
    metrics and checkpoints, no LoRA."""
    shutil.copytree(fixture, to)
    if not finished:
        for name in ("lora.safetensors", "lora_kohya.safetensors", "embeddings.safetensors",
                     "gsnr.json", "samples"):  # fmt: skip
            target = to / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    return to


def truncate_checkpoints(run: Path) -> None:
    """Cut every checkpoint's ``trainable.safetensors`` in half (a disk that filled up)."""
    for tensors in sorted(run.glob("checkpoints/step-*/trainable.safetensors")):
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------- the cases
Build = Callable[[Path, Path], object]  # (the case's folder, the fixture run) -> files in it


def _concept(**changes) -> Build:
    return lambda here, run: write_concept(here, **changes)


@dataclass(frozen=True)
class Case:
    name: str  # also its folder, DIR/<name>/, where the command runs
    kind: str  # config, data, model, run, checkpoint, output, app
    wrong: str  # what is wrong, in the table's words
    argv: tuple[str, ...]  # the command: an entry point and its arguments
    build: Build = _concept()
    names: str = ""  # the error line must contain this: the key, value or file at fault
    expected: int = EXIT_USER_ERROR
    needs_fixture: bool = False


def _train(*args: str) -> tuple[str, ...]:
    return ("sai-train-lora", "--concept", "thing.yaml", *args)


def _corrupt_run(here: Path, run: Path) -> None:
    truncate_checkpoints(copy_run(run, here / "run", finished=False))


def _not_empty(here: Path, run: Path) -> None:
    write_concept(here)
    (here / "out").mkdir()
    (here / "out" / "notes.txt").write_text("an earlier run's notes\n", encoding="utf-8")


def _pickle_checkpoint(here: Path, run: Path) -> None:
    """``model.ckpt``: a pickle, as old checkpoints are (an empty state dict: it is never run)."""
    (here / "model.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))


def _two(*builds: Build) -> Build:
    def build(here: Path, run: Path) -> None:
        for b in builds:
            b(here, run)

    return build


def _mkdir(name: str) -> Build:
    return lambda here, run: (here / name).mkdir(parents=True)


def _run_copy(change: Callable[[Path], object] | None = None) -> Build:
    """A copy of the finished fixture run as ``run``, then ``change(run)``; and notes.txt."""

    def build(here: Path, run: Path) -> None:
        copy = copy_run(run, here / "run")
        (here / "notes.txt").write_text("notes\n", encoding="utf-8")
        if change is not None:
            change(copy)

    return build


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _appended(text: str) -> Build:
    """The good concept with ``text`` appended to thing.yaml as it is (raw YAML)."""

    def build(here: Path, run: Path) -> None:
        path = write_concept(here)
        path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")

    return build


# nine levels of nine aliases each: 9**9 values once expanded, in 341 bytes ("billion laughs")
_ALIAS_BOMB = "  rank:\n    - &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"    - &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


CASES: tuple[Case, ...] = (
    # -- config: the concept YAML, flags and --set, checked before any model library loads
    Case("concept-typo-key", "config", "concept YAML with a typo key (`tokn:`)", _train(),
         _concept(token=None, tokn="<Vthing>"), names="did you mean 'token'"),
    Case("concept-not-yaml", "config", "concept file that is not valid YAML", _train(),
         lambda here, run: (here / "thing.yaml").write_text("token: <Vthing>\nclass_word: [dog\n"),
         names="thing.yaml"),
    Case("concept-duplicate-key", "config", "concept YAML that gives a key twice",
         _train(), _appended("data: other\n"), names="'data' is given twice"),
    Case("concept-alias-bomb", "config",
         "concept YAML whose aliases expand to 9**9 values (\"billion laughs\", 341 bytes)",
         _train(), _appended(_ALIAS_BOMB), names="more than 10,000 values"),
    Case("prompt-placeholder", "config", "validation prompt with an unknown placeholder (`{tokn}`)",
         _train(), _concept(validation_prompts=["a photo of {tokn}"]), names="{tokn}"),
    Case("prompt-stray-brace", "config", "validation prompt with a stray `{`", _train(),
         _concept(validation_prompts=["a photo of {token"]), names="stray '{'"),
    Case("seed-out-of-range", "config", "a seed past 2**63",
         _train("--seed", "99999999999999999999999"), names="2**63"),
    Case("validation-seed-out-of-range", "config", "a validation seed past 2**63",
         _train("--set", "validation_seeds=[99999999999999999999]"), names="validation_seeds"),
    Case("alpha-inf", "config", "an infinite LoRA alpha", _train("--set", "alpha=.inf"),
         names="lora.alpha"),
    Case("scaled-reg-nan", "config", "scaled-AdamW's regulariser NaN",
         _train("--optimizer", "scaled-adamw", "--set", "scaled_reg=.nan"), names="scaled_reg"),
    Case("max-steps-huge", "config", "max_steps of 10**20",
         _train("--set", "max_steps=99999999999999999999"), names="max_steps"),
    Case("log-every-zero", "config", "log_every 0", _train("--set", "log_every=0"),
         names="log_every"),
    Case("concept-file-missing", "config", "concept file that does not exist",
         ("sai-train-lora", "--concept", "nothere.yaml"), names="nothere.yaml"),
    Case("concept-name-unknown", "config", "concept name that is not shipped (`pottr`)",
         ("sai-train-lora", "--concept", "pottr"), names="did you mean 'potter'"),
    Case("train-wrong-type", "config", "wrong type in the YAML's train section (`rank: four`)",
         _train(), _concept(train={"max_steps": 1, "resolution": 32, "rank": "four"}),
         names="rank"),
    Case("concept-words-initialisers", "config",
         "two concept words but one initialiser (`<Vthing1>+<Vthing2>` from `dog`)", _train(),
         _concept(token="<Vthing1>+<Vthing2>"), names="one per word"),
    Case("concept-initialiser-split", "model",
         "an initialiser the tokenizer splits into several tokens (`<rand-0.01>+hippopotamus`)",
         _train(), _concept(token="<Vthing1>+<Vthing2>", class_word="<rand-0.01>+hippopotamus"),
         names="hippopotamus"),
    Case("attn-reg-no-masks", "data",
         "`attn_reg_weight: 0.01` on a concept whose data has no masks", _train(),
         _concept(train={"max_steps": 1, "resolution": 32, "attn_reg_weight": 0.01}),
         names="attn_reg_weight"),
    Case("set-unknown-key", "config", "unknown --set key (`learning_rat`)",
         _train("--set", "learning_rat=1"), names="did you mean 'lr'"),
    Case("set-not-a-choice", "config", "--set value not among the choices (`fp32`)",
         _train("--set", "mixed_precision=fp32"), names="fp32"),
    Case("set-no-read-as-false", "config",
         "--max-steps 0 beside `--set mixed_precision=no` (a good value that YAML reads as false)",
         _train("--set", "mixed_precision=no", "--max-steps", "0"), names="max_steps"),
    Case("optimizer-unknown", "config", "--optimizer that does not exist (`adam`)",
         _train("--optimizer", "adam"), names="adam"),
    Case("resolution-not-8", "config", "resolution not a multiple of 8",
         _train("--resolution", "500"), names="resolution"),
    Case("max-steps-zero", "config", "zero training steps", _train("--max-steps", "0"),
         names="max_steps"),
    Case("lr-absurd", "config", "absurd learning rate", _train("--lr", "1e9"), names="lr"),
    Case("setting-cannot-act", "config", "a setting that cannot act (`momentum` with AdamW)",
         _train("--optimizer", "adamw", "--set", "momentum=0.8"), names="optimizer.name"),
    Case("section-given-a-value", "config", "a section given a value (`--set lora=8`)",
         _train("--set", "lora=8"), names="lora.rank"),
    # -- data: the concept's folder, checked before the model loads
    Case("data-missing", "data", "data folder that does not exist", _train(),
         _concept(images=None, data="nothere"), names="nothere"),
    Case("data-empty", "data", "data folder without images", _train(), _concept(images=0),
         names="no images"),
    Case("data-corrupt-image", "data", "random bytes named `.png` among the images", _train(),
         _two(_concept(), lambda here, run: junk(here / "data" / "broken.png")),
         names="broken.png"),
    Case("validation-split-one-image", "data",
         "`validation_split: 0.5` on a concept of one image", _train(),
         _concept(images=1, train={"max_steps": 1, "resolution": 32, "validation_split": 0.5}),
         names="validation_split"),
    Case("class-data-missing", "data", "`class_data` folder that does not exist",
         _train("--set", "class_data=nodogs"), names="nodogs"),
    Case("buckets-with-paste", "config",
         "`buckets: true` beside `augmentation: resize-crop-pad`",
         _train("--set", "buckets=true", "--set", "bucket_step=8",
                "--set", "augmentation=resize-crop-pad", "--set", "cache_latents=false"),
         names="augmentation=resize-crop-pad"),
    # -- model: --base-model
    Case("base-missing", "model", "base model file that does not exist",
         _train("--base-model", "models/realisticVision.safetensors"),
         names="realisticVision.safetensors"),
    Case("base-pickle", "model", "pickle `.ckpt` base model", _train("--base-model", "model.ckpt"),
         _two(_concept(), _pickle_checkpoint), names="model.ckpt"),
    Case("base-truncated", "model", "`.safetensors` base model that is cut short (random bytes)",
         _train("--base-model", "partial.safetensors"),
         _two(_concept(), lambda here, run: junk(here / "partial.safetensors")),
         names="partial.safetensors"),
    Case("base-not-diffusers", "model", "base model folder that is not a diffusers model",
         _train("--base-model", "notamodel"),
         _two(_concept(), lambda here, run: junk(here / "notamodel" / "readme.txt", 64)),
         names="model_index.json"),
    # -- run folders: --output-dir, --resume, a run given to the other tools
    Case("output-not-empty", "run", "--output-dir that holds other files",
         _train("--output-dir", "out"), _not_empty, names="not empty"),
    Case("output-a-file", "run", "--output-dir that is a file",
         _train("--output-dir", "thing.yaml"), names="is a file"),
    Case("output-under-a-file", "run", "--output-dir under a file",
         _train("--output-dir", "thing.yaml/run"), names="which is a file"),
    Case("resume-not-a-run", "run", "--resume of a folder that is not a run",
         ("sai-train-lora", "--resume", "notarun"), _mkdir("notarun"), names="run.yaml"),
    Case("resume-latest-none", "run", "--resume latest with no runs",
         ("sai-train-lora", "--resume", "latest"), _mkdir("elsewhere"), names="runs/"),
    Case("resume-new-settings", "run", "--resume with a new learning rate",
         ("sai-train-lora", "--resume", "run", "--lr", "0.3"),
         lambda here, run: copy_run(run, here / "run", finished=False), names="--max-steps",
         needs_fixture=True),
    Case("sample-unfinished", "run", "sai-sample on a run that has not finished",
         ("sai-sample", "--run", "run", "--prompt", PROMPT),
         lambda here, run: copy_run(run, here / "run", finished=False), names="--resume",
         needs_fixture=True),
    Case("sample-seed-too-big", "run", "sai-sample with a seed past 2**63",
         ("sai-sample", "--run", "run", "--prompt", PROMPT, "--seed",
          "99999999999999999999999"), _run_copy(), names="--seed", needs_fixture=True),
    Case("sample-prompt-typo", "run", "sai-sample prompt with `{tokn}`",
         ("sai-sample", "--run", "run", "--prompt", "a {tokn}"), _run_copy(), names="{tokn}",
         needs_fixture=True),
    Case("sample-steps-zero", "run", "sai-sample --steps 0",
         ("sai-sample", "--run", "run", "--prompt", PROMPT, "--steps", "0"), _run_copy(),
         names="--steps", needs_fixture=True),
    Case("sample-guidance-nan", "run", "sai-sample --guidance nan",
         ("sai-sample", "--run", "run", "--prompt", PROMPT, "--guidance", "nan"), _run_copy(),
         names="--guidance", needs_fixture=True),
    Case("sample-out-file", "output", "sai-sample --out that is a file",
         ("sai-sample", "--run", "run", "--prompt", PROMPT, "--out", "notes.txt"), _run_copy(),
         names="notes.txt", needs_fixture=True),
    Case("sample-lora-truncated", "run", "sai-sample of a run whose `lora.safetensors` is cut in half",
         ("sai-sample", "--run", "run", "--prompt", PROMPT),
         _run_copy(lambda run: _cut_in_half(run / "lora.safetensors")),
         names="lora.safetensors", needs_fixture=True),
    Case("sample-words-missing", "run", "sai-sample of a run whose `embeddings.safetensors` is gone",
         ("sai-sample", "--run", "run", "--prompt", PROMPT),
         _run_copy(lambda run: (run / "embeddings.safetensors").unlink()),
         names="embeddings.safetensors", needs_fixture=True),
    Case("compare-out-dir", "output", "sai-compare --out that is a folder",
         ("sai-compare", "run", "--prompt", PROMPT, "--out", "grid.png"),
         _run_copy(lambda run: (run.parent / "grid.png").mkdir()), names="grid.png",
         needs_fixture=True),
    Case("export-into-run", "output", "sai-export over the run's own `lora.safetensors`",
         ("sai-export", "run", "--format", "mix-of-show", "--out", "run/lora.safetensors"),
         _run_copy(), names="never replaces", needs_fixture=True),
    Case("export-out-exists", "output", "sai-export --out a file that exists, without --force",
         ("sai-export", "run", "--format", "mix-of-show", "--out", "notes.txt"), _run_copy(),
         names="--force", needs_fixture=True),
    Case("eval-not-a-run", "run", "sai-eval on a folder that is not a run",
         ("sai-eval", "notarun"), _mkdir("notarun"), names="run.yaml"),
    # -- checkpoint: what --resume reads
    Case("resume-truncated-checkpoint", "checkpoint",
         "--resume of a run whose checkpoints' `trainable.safetensors` are cut in half",
         ("sai-train-lora", "--resume", "run"), _corrupt_run, names="step-000002",
         needs_fixture=True),
    # -- output files
    Case("compare-out-jpg", "output", "sai-compare --out with a `.jpg` name",
         ("sai-compare", "run", "--prompt", PROMPT, "--out", "grid.jpg"),
         lambda here, run: copy_run(run, here / "run"), names="grid.jpg", needs_fixture=True),
    # -- app
    Case("app-runs-dir-missing", "app", "sai-app --runs-dir that does not exist",
         ("sai-app", "--runs-dir", "nothere"), _mkdir("elsewhere"), names="nothere"),
    Case("app-port-out-of-range", "app", "sai-app --port out of range",
         ("sai-app", "--runs-dir", "runs", "--port", "70000"), _mkdir("runs"), names="70000"),
)  # fmt: skip


# ---------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    case: Case
    returncode: int | None  # None: no answer within TIMEOUT_S
    stderr: str  # DIR for the temporary folder
    changed: list[str]  # paths the command created, changed or removed in its folder
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if ERROR_LINE.match(line)]

    @property
    def lines_after_error(self) -> int:
        """Lines on stderr after the (first) error line: 0 for a one-line message."""
        lines = self.stderr.splitlines()
        first = next((i for i, line in enumerate(lines) if ERROR_LINE.match(line)), len(lines))
        return sum(bool(line.strip()) for line in lines[first + 1 :])

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr

    @property
    def shown(self) -> str:
        """The line the table shows: the error line; else the end of a traceback, or the
        first line on stderr. Library chatter before the error line (progress bars, warnings)
        and argparse's usage line are left out."""
        if self.returncode is None:
            return f"(no answer within {TIMEOUT_S} s)"
        if self.error_lines:
            return self.error_lines[0]
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        if self.traceback:
            return f"Traceback ... {lines[-1]}"
        if self.returncode == 0:
            return "(no error: the input was accepted)"
        return lines[0] if lines else "(nothing on stderr)"

    def problems(self) -> list[str]:
        """How the case was not refused as it should be; [] when it was."""
        out = []
        if self.returncode != self.case.expected:
            out.append(f"exit code {self.returncode}, expected {self.case.expected}")
        if self.traceback:
            out.append("a traceback on stderr")
        if len(self.error_lines) != 1:
            out.append(f"{len(self.error_lines)} error lines on stderr, expected 1")
        else:
            if self.case.names not in self.error_lines[0]:
                out.append(f"the error line does not name {self.case.names!r}")
            if self.lines_after_error:
                out.append(f"the message runs on over {self.lines_after_error} more lines")
        if self.changed:
            out.append(f"left files behind: {', '.join(self.changed[:5])}")
        return out


def command(argv: tuple[str, ...]) -> list[str]:
    """The installed entry point beside this Python; ``python -c`` where it is not installed."""
    program, *args = argv
    script = Path(sys.executable).parent / program
    if script.is_file():
        return [str(script), *args]
    entry = ENTRY_POINTS[program]
    return [sys.executable, "-c", f"from sai_diffusion.cli import {entry}; {entry}()", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``folder``: (size, mtime) for a file, None for a folder."""
    out = {}
    for path in folder.rglob("*"):
        stat = path.stat()
        out[path.relative_to(folder).as_posix()] = (
            (stat.st_size, stat.st_mtime_ns) if path.is_file() else None
        )
    return out


def train_fixture(folder: Path) -> Path:
    """The finished run the run and checkpoint cases copy: 2 steps, a checkpoint after each."""
    folder.mkdir(parents=True)
    write_concept(folder)
    argv = ("sai-train-lora", "--concept", "thing.yaml", "--max-steps", "2",
            "--checkpoint-every", "1", "--output-dir", "run")  # fmt: skip
    proc = subprocess.run(command(argv), cwd=folder, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the fixture run did not train ({shlex.join(argv)}):\n{proc.stderr}")
    return folder / "run"


def run_case(case: Case, root: Path, fixture: Future[Path]) -> Outcome:
    here = root / case.name
    here.mkdir(parents=True)
    case.build(here, fixture.result() if case.needs_fixture else root / "no-fixture")
    before = _snapshot(here)
    start = time.monotonic()
    try:
        proc = subprocess.run(command(case.argv), cwd=here, env=_env(), capture_output=True,
                              text=True, timeout=TIMEOUT_S)  # fmt: skip
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stderr = None, exc.stderr or ""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    seconds = time.monotonic() - start
    after = _snapshot(here)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p, 0) != after.get(p, 0))
    for path in dict.fromkeys([str(root.resolve()), str(root)]):  # the same text on every run
        stderr = stderr.replace(path, "DIR")
    return Outcome(case, returncode, stderr.replace(str(REPO), "REPO"), changed, seconds)


def run_all(root: Path, cases: tuple[Case, ...] = CASES) -> list[Outcome]:
    """Build and run every case under ``root`` (an empty or missing folder); outcomes in the
    order of ``cases``. The fixture run trains first, beside the cases that do not need it."""
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        if any(c.needs_fixture for c in cases):
            fixture = pool.submit(train_fixture, root / "fixture")
        else:
            fixture = Future()
        ordered = sorted(cases, key=lambda c: c.needs_fixture)  # they wait for the fixture
        futures = {c.name: pool.submit(run_case, c, root, fixture) for c in ordered}
        return [futures[c.name].result() for c in cases]


# -------------------------------------------------------------------------------- the table
HEADER = """\
# Bad inputs

What the command-line tools answer to input they cannot use. Each row is one real process,
run in a fresh folder `DIR/<case>/` that holds the files the command names (`thing.yaml`: a
concept with two 32 px images; `run`: a copy of a 2-step run of the built-in miniature model,
with a checkpoint after each step, unfinished where the row says so). The last column is the
`error:` line; lines the libraries print before it (progress bars, warnings) and argparse's
usage line are left out.

Every row should read exit code 2 and one `error:` line that names the file or setting at
fault and the fix, with no traceback and nothing written (the design's rule for errors).
`tests/test_bad_inputs.py` runs the same cases, holds each to that, and fails when this table
is not what they print. Regenerate it with

    python scripts/bad_inputs.py --write docs/bad-inputs.md

| kind | bad input | command | exit code | first line the user sees |
|---|---|---|---|---|
"""


def _cell(text: str, *, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    if not code:
        return text
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def render(outcomes: list[Outcome]) -> str:
    rows = [
        f"| {o.case.kind} | {_cell(o.case.wrong)} | {_cell(shlex.join(o.case.argv), code=True)} "
        f"| {'timeout' if o.returncode is None else o.returncode} | {_cell(o.shown, code=True)} |"
        for o in outcomes
    ]
    return HEADER + "\n".join(rows) + "\n"


def summary(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        problems = o.problems()
        verdict = "ok  " if not problems else "FAIL"
        lines.append(
            f"{verdict} {o.case.name:<28} exit {o.returncode}  {o.seconds:5.1f} s  {o.shown}"
        )
        lines += [f"       - {p}" for p in problems]
    failed = sum(bool(o.problems()) for o in outcomes)
    lines.append(f"{len(outcomes) - failed} of {len(outcomes)} refused as expected")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="write the table to this Markdown file")
    group.add_argument("--check", type=Path, help="exit 1 if this file is not the table")
    p.add_argument("--only", nargs="+", metavar="CASE", help="run these cases only (no table)")
    p.add_argument("--keep", type=Path, help="build the cases in this new folder and keep it")
    args = p.parse_args(argv)
    cases = CASES
    if args.only:
        unknown = set(args.only) - {c.name for c in CASES}
        if unknown or args.write or args.check:
            p.error(f"--only takes case names ({', '.join(c.name for c in CASES)}), without a table"
                    if unknown else "--only runs a part of the cases: no --write or --check")  # fmt: skip
        cases = tuple(c for c in CASES if c.name in args.only)
    if args.keep:
        outcomes = run_all(args.keep, cases)
    else:
        with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
            outcomes = run_all(Path(tmp), cases)
    print(summary(outcomes))
    table = render(outcomes)
    if args.check:
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else ""
        if current != table:
            print(f"{args.check} is stale; run: python scripts/bad_inputs.py --write "
                  f"{args.check}", file=sys.stderr)  # fmt: skip
            return 1
    elif args.write:
        args.write.write_text(table, encoding="utf-8")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
