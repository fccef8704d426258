"""The optimizers' names and what they keep per parameter: plain Python, so that the command
line can list them (``--help``) and settings can be checked without importing torch."""

from __future__ import annotations

# sgd-sai (ours), the Riemannian-preconditioned LoRA pair through peft, and torch's own two.
OPTIMIZERS = ("sgd-sai", "scaled-adamw", "scaled-sgd", "adamw", "sgd")

# Buffers of optimizer state per trained tensor, each the tensor's size: momentum for the SGD
# family, exp_avg and exp_avg_sq for the AdamW family. SGD-SaI's per-tensor scalars are
# negligible beside them.
STATE_BUFFERS = {"sgd-sai": 1, "scaled-adamw": 2, "scaled-sgd": 1, "adamw": 2, "sgd": 1}

# SGD-SaI's per-tensor lr scale rules as the trainer's ``sai_scale`` names them, each mapped to
# SGDSaI's ``normalize``: the paper's g-SNR / max g-SNR, the raw g-SNR of the released sgd-sai
# 1.0.3, and sqrt(numel) of the authors' v1.1.0 branch (docs/dev/optimizer-spec.md).
SAI_SCALES = {"paper": "max", "released": "none", "sqrt-numel": "sqrt-numel"}
