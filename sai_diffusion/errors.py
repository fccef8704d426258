"""The errors a user may see, and the exit codes the command-line tools map them to.

Plain Python on purpose: ``sai-train-lora --help`` imports this module and must not pay for
torch or accelerate.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad input: a config, a dataset, a model path, a hyperparameter
EXIT_DIVERGED = 3  # the loss became NaN or inf


class UserError(Exception):
    """Bad input from the user: a config, a dataset, a model path, a hyperparameter.

    The message is shown as it is, without a traceback, and must name the file or key
    and say how to fix it. Command-line entry points exit with ``EXIT_USER_ERROR``.
    """


class Interrupted(Exception):
    """A training run stopped by SIGINT or SIGTERM. Its message says what was kept and the
    command that resumes it; entry points exit with 128 + the signal's number (130, 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint.
    Command-line entry points exit with ``EXIT_DIVERGED``."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), without
    a final full stop: for wrapping a library's error into one line of ours."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(".")
