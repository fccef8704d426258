"""The host pipeline: each micro-batch's examples prepared ahead of the training thread.

Preparing an example is CPU work: decode the image, resize, crop, flip and mask it, draw its
noise (``inputs.InputBuilder.prepare``). Done on the training thread it leaves the GPU idle
between steps (about 24 ms per 512 px example with resize-crop-pad). With ``workers`` > 0, a
torch ``DataLoader``'s worker processes prepare the micro-batches of the coming steps while the
device trains, in order, into pinned memory, and the training thread only moves them to the
device (``InputBuilder.finish``). Every draw of an example comes from its own streams
(``batches``), so which process prepares it changes nothing: 0, 1 or N workers train bitwise
the same. ``Feed.waited`` is how long the last step waited for its inputs.

Micro-batch c of this process is (step, micro) = divmod(c, grad_accum); the feed expects them
in order and starts over from wherever it is asked next otherwise (a resumed run, a benchmark).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .batches import Batches
from .inputs import HostBatch, InputBuilder, Inputs

# micro-batches each worker keeps ready ahead of the training thread
PREFETCH_PER_WORKER = 2


def default_workers(device: torch.device, cpus: int | None = None) -> int:
    """``data_workers`` left unset: on a GPU, worker processes (up to 4 per training process,
    the machine's cores shared among its training processes, one core each left to them); on
    the CPU none, since the workers would take the cores that train."""
    if device.type == "cpu" or not _can_fork():
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by accelerate / torchrun
    per_process = (cpus or os.cpu_count() or 2) // local
    return max(1, min(4, per_process - 1))


def _can_fork() -> bool:
    # the workers are forked: the dataset (images, schedule) is inherited, never pickled
    return sys.platform.startswith("linux")


class Feed:
    """``feed.inputs(step, micro)``: the ``Inputs`` of that micro-batch, prepared by
    ``workers`` processes ahead of time (0: here, when asked). ``close()`` stops the workers."""

    def __init__(
        self,
        batches: Batches,
        builder: InputBuilder,
        *,
        grad_accum: int,
        workers: int,
        pin_memory: bool,
    ) -> None:
        if workers > 0 and not _can_fork():
            raise UserError(
                f"data_workers={workers}: worker processes are forked, which this platform "
                f"({sys.platform}) does not do; set data_workers=0"
            )
        self.batches, self.builder = batches, builder
        self.grad_accum, self.workers, self.pin_memory = grad_accum, workers, pin_memory
        self.waited = 0.0  # seconds the last micro-batch waited for its host half
        self._dataset = _MicroBatches(self)
        self._next: int | None = None  # the micro-batch the running iterator yields next
        self._iterator = None

    def inputs(self, step: int, micro: int) -> Inputs:
        chunk = step * self.grad_accum + micro
        start = time.perf_counter()
        host = self._host_batch(chunk)
        self.waited = time.perf_counter() - start
        return self.builder.finish(host)

    def _host_batch(self, chunk: int) -> HostBatch:
        if self.workers == 0:
            return self._dataset[chunk]
        if self._iterator is None or self._next != chunk:
            self.close()
            loader = DataLoader(
                self._dataset, batch_size=None, sampler=itertools.count(chunk),
                num_workers=self.workers, prefetch_factor=PREFETCH_PER_WORKER,
                pin_memory=self.pin_memory, worker_init_fn=_ignore_ctrl_c,
                multiprocessing_context="fork",
            )  # fmt: skip
            self._iterator = iter(loader)
        self._next = chunk + 1
        item = next(self._iterator)
        if isinstance(item, _Failed):  # a worker's UserError, said as the run's own
            self.close()
            raise UserError(item.message)
        return item

    def close(self) -> None:
        """Stop the workers (the next ``inputs`` starts them again)."""
        if self._iterator is not None:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
        self._next = None


class _MicroBatches(Dataset):
    """Micro-batch c of this process as a ``HostBatch``; any c >= 0 (the schedule has no end)."""

    def __init__(self, feed: Feed) -> None:
        self.batches, self.builder, self.grad_accum = feed.batches, feed.builder, feed.grad_accum
        self.in_worker = feed.workers > 0

    def __getitem__(self, chunk: int) -> HostBatch | _Failed:
        step, micro = divmod(chunk, self.grad_accum)
        try:
            return self.builder.prepare(self.batches.batch(step, micro))
        except UserError as err:  # a bad image found by a worker: one line, as without workers
            if self.in_worker:
                return _Failed(str(err))
            raise


class _Failed:
    def __init__(self, message: str) -> None:
        self.message = message


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the training thread decides (finish the step,
    write a checkpoint), so a worker must live on to feed the step in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
