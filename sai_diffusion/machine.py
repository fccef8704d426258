"""What a measurement ran on, for the records benchmarks and builders write beside their figures
(docs/benchmarks.md quotes them: an absolute time means nothing without its device), and the
peak memory of a run (training's metrics and scripts/bench_train.py)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource

import torch


def describe_machine(device: str | torch.device = "cpu") -> dict[str, object]:
    """Platform, CPU model and count, torch's thread count, Python and torch versions, and the
    GPU's name when ``device`` is a CUDA device."""
    device = torch.device(device)
    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    """``/proc/cpuinfo``'s model name on Linux, else what ``platform`` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


_CLEAR_REFS, _STATUS = "/proc/self/clear_refs", "/proc/self/status"


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak: runs trained one after another in one process (the app, a
    sweep) must not report an earlier run's. On Linux, writing 5 to clear_refs resets the
    process's peak resident size (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open(_CLEAR_REFS, "w") as f:
        f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocations, or the process's peak
    resident size on the CPU (the lifetime peak where /proc cannot say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, ValueError), open(_STATUS) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
