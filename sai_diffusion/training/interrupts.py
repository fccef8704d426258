"""Ctrl-C and SIGTERM during training keep the work.

The first SIGINT or SIGTERM asks the loop to stop once the step in flight is done; the loop
then writes a checkpoint of that step and raises ``errors.Interrupted`` with the command that
resumes it. A second signal aborts at once (``KeyboardInterrupt``), leaving the last complete
checkpoint (checkpoints are written under a temporary name and renamed when complete). Under
DDP every rank stops at the same step: the ranks agree on the request after each step.

Handlers are installed only in the main thread (Python's rule); elsewhere (a run started by
the app in a thread) the default behaviour stays.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Use as a context manager around the loop; ``agreed(accelerator)`` after each step is
    the signal number to stop for (all ranks the same), or 0."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum:  # the second one: abort now
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
            "(press Ctrl-C again to abort at once, keeping the last complete checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, accelerator) -> int:
        """The request of any rank (the largest signal number), the same on every rank."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())
