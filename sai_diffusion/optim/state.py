"""How much memory an optimizer's state takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def state_bytes(state: torch.optim.Optimizer | Mapping[Any, Mapping[str, Any]]) -> int:
    """Bytes of every tensor in an optimizer's per-parameter state: buffers and per-tensor
    scalars, each storage counted once.

    ``state`` is an optimizer, or the ``"state"`` entry of its ``state_dict()`` (for example as
    read back from a checkpoint's ``optimizer.pt``).
    """
    per_param = state.state if isinstance(state, torch.optim.Optimizer) else state
    seen, total = set(), 0
    for values in per_param.values():
        for value in values.values():
            if torch.is_tensor(value) and (value.data_ptr(), value.numel()) not in seen:
                seen.add((value.data_ptr(), value.numel()))
                total += value.numel() * value.element_size()
    return total
