"""The one error type for bad user input, and the exit code it maps to."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: a config, a dataset, a model path, a hyperparameter.

    The message is shown as it is, without a traceback, and must name the file or key
    and say how to fix it. Command-line entry points exit with ``EXIT_USER_ERROR``.
    """
