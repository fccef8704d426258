"""Optimizers: SGD-SaI (arXiv:2412.11768) and the factory that builds every optimizer by name.

Depends on torch alone (peft only for the scaled-* optimizers). The names (``OPTIMIZERS``,
``STATE_BUFFERS``) import without torch, so that ``sai-train-lora --help`` stays instant; the
rest loads torch on first use:

    from sai_diffusion.optim import SGDSaI, build_optimizer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .names import OPTIMIZERS, SAI_SCALES, STATE_BUFFERS

if TYPE_CHECKING:
    from .factory import build_optimizer
    from .sgd_sai import SGDSaI, gsnr_table
    from .state import state_bytes

__all__ = [
    "OPTIMIZERS",
    "SAI_SCALES",
    "STATE_BUFFERS",
    "SGDSaI",
    "build_optimizer",
    "gsnr_table",
    "state_bytes",
]

_TORCH_PARTS = {
    "SGDSaI": ".sgd_sai",
    "gsnr_table": ".sgd_sai",
    "build_optimizer": ".factory",
    "state_bytes": ".state",
}


def __getattr__(name: str):
    if name in _TORCH_PARTS:
        return getattr(importlib.import_module(_TORCH_PARTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
