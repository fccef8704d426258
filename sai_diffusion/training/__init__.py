"""The training recipe (``recipe``: setup, the loop, the outputs) and its parts: the concept's
images as tensors (``data``), the objective (``loss``), checkpoints and resuming
(``checkpoints``)."""
