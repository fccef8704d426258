"""What a measurement ran on, for the records benchmarks and builders write beside their figures
(docs/benchmarks.md quotes them: an absolute time means nothing without its device)."""

from __future__ import annotations

import contextlib
import os
import platform

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
