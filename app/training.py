"""The Train tab's translation: form fields -> the ``sai-train-lora`` command line, run as a
child process whose progress bar is read back. Training itself is the CLI's."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from sai_diffusion.errors import UserError

# optional flags of the Train tab, in field order; an empty field leaves the concept's setting
TRAIN_FLAGS = (
    ("--lr", float),
    ("--max-steps", int),
    ("--resolution", int),
    ("--rank", int),
    ("--seed", int),
)


def train_args(
    runs_dir: Path,
    concept: str,
    base_model: str,
    optimizer: str,
    *values: str,
) -> list[str]:
    """The ``sai-train-lora`` command line for the Train tab's fields: concept, base model
    (empty: the concept's, else the built-in miniature model), optimizer, then the
    ``TRAIN_FLAGS`` values (text; empty: the concept's default) and the run folder, which must
    lie inside the runs folder so that the run shows up here.

    Ranges are the CLI's to check: it says what is wrong in the progress box.

    Raises:
        UserError: a missing concept, a field that is not a number, or a run folder outside
            the runs folder.
    """
    *numbers, run_name = values
    if not (concept or "").strip():
        raise UserError("Train: choose a concept (a shipped name or a YAML file).")
    args = [_train_program(), "--concept", concept.strip()]
    if (base_model or "").strip():  # empty: the concept's own, else the built-in miniature
        args += ["--base-model", base_model.strip()]
    args += ["--optimizer", optimizer]
    for (flag, kind), value in zip(TRAIN_FLAGS, numbers, strict=True):
        text = str(value if value is not None else "").strip()
        if not text:
            continue
        try:
            number = kind(text)
        except ValueError:
            what = "a number" if kind is float else "a whole number"
            raise UserError(f"Train: {flag} must be {what}, got {text!r}.") from None
        args += [flag, f"{number:g}" if kind is float else str(number)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (run_name or "").strip() or f"{Path(concept.strip()).stem}/{optimizer}-{stamp}"
    out = (runs_dir / name).resolve()
    if not out.is_relative_to(runs_dir) or out == runs_dir:
        raise UserError(f"Train: the run folder {name!r} must be inside {runs_dir}.")
    return [*args, "--output-dir", str(out)]


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
