"""The Train tab's translation: form fields -> the ``sai-train-lora`` command line, run as a
child process whose progress bar is read back. Training itself is the CLI's."""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from sai_diffusion.compare import SEED_LIMIT
from sai_diffusion.errors import UserError

# The Train tab's settings, in the order of its fields. After concept, base model and
# optimizer come the optional flags (an empty one leaves the concept's setting), then the folder.
TRAIN_FLAGS = {
    "lr": ("--lr", float),
    "max_steps": ("--max-steps", int),
    "resolution": ("--resolution", int),
    "rank": ("--rank", int),
    "seed": ("--seed", int),
}
TRAIN_FIELDS = ("concept", "base_model", "optimizer", *TRAIN_FLAGS, "run_folder")


def train_args(runs_dir: Path, settings: Mapping[str, str | None]) -> list[str]:
    """The ``sai-train-lora`` command line for the Train tab's ``settings`` (``TRAIN_FIELDS``
    names to text): concept, base model (empty: the concept's, else the built-in miniature
    model), optimizer, the ``TRAIN_FLAGS`` values (empty: the concept's default) and the run
    folder, which must lie inside the runs folder so that the run shows up here. A missing
    entry counts as empty.

    Ranges are the CLI's to check (it says what is wrong in the progress box), but for the
    seed's: one no generator takes is refused here.

    Raises:
        UserError: a missing concept, a field that is not a (finite) number, a seed outside
            [0, 2**63), or a run folder outside the runs folder.
        ValueError: a setting that is not one of ``TRAIN_FIELDS`` (a programming error).
    """
    unknown = set(settings) - set(TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"train_args: unknown settings {sorted(unknown)}; known: {TRAIN_FIELDS}")
    text = {name: str(settings.get(name) or "").strip() for name in TRAIN_FIELDS}
    if not text["concept"]:
        raise UserError("Train: choose a concept (a shipped name or a YAML file).")
    args = [_train_program(), "--concept", text["concept"]]
    if text["base_model"]:  # empty: the concept's own, else the built-in miniature
        args += ["--base-model", text["base_model"]]
    optimizer = text["optimizer"] or "sgd-sai"
    args += ["--optimizer", optimizer]
    for name, (flag, kind) in TRAIN_FLAGS.items():
        if not text[name]:
            continue
        try:
            number = kind(text[name])
        except ValueError:  # int() also refuses more than 4,300 digits
            number = None
        if number is None or (kind is float and not math.isfinite(number)):
            what = "a finite number" if kind is float else "a whole number"
            raise UserError(f"Train: {flag} must be {what}, got {short(text[name])}.")
        if name == "seed" and not 0 <= number < SEED_LIMIT:
            raise UserError(
                f"Train: --seed {short(text[name])} is out of range; a seed is a whole number "
                "from 0 to 2**63 - 1."
            )
        args += [flag, f"{number:g}" if kind is float else str(number)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = text["run_folder"] or f"{Path(text['concept']).stem}/{optimizer}-{stamp}"
    out = (runs_dir / name).resolve()
    if not out.is_relative_to(runs_dir) or out == runs_dir:
        raise UserError(f"Train: the run folder {name!r} must be inside {runs_dir}.")
    return [*args, "--output-dir", str(out)]


def short(text: str, limit: int = 40) -> str:
    """A bad value quoted in a message: its start only, however long it is."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def shown_command(args: list[str]) -> str:
    """The command as a user would type it (the program by name, not this venv's path)."""
    return shlex.join(["sai-train-lora", *args[1:]])


def _train_program() -> str:
    beside = Path(sys.executable).with_name("sai-train-lora")  # this environment's script
    return str(beside) if beside.is_file() else "sai-train-lora"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves between nested bars


class TrainingJob:
    """``sai-train-lora`` as a child process; its progress bar is read from stderr."""

    def __init__(self, args: list[str], run_dir: Path) -> None:
        self.run_dir = run_dir
        self._last = ""
        self._lines: list[str] = []
        self._proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        assert self._proc.stdout is not None
        while chunk := self._proc.stdout.read1(4096):
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)  # tqdm redraws with \r
            for part in parts:
                text = _ANSI.sub("", part.decode("utf-8", "replace")).strip()
                if "%|" in text:  # a progress bar: keep the training one, not loading bars
                    if "step" in text:
                        self._last = text
                elif text:
                    self._lines = [*self._lines[-20:], text]

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        self._proc.terminate()

    def status(self) -> str:
        rc = self._proc.poll()
        state = (
            "training" if rc is None else ("finished" if rc == 0 else f"ended with exit code {rc}")
        )
        return "\n".join([f"{state}: {self.run_dir}", self._last, *self._lines[-8:]]).strip()
