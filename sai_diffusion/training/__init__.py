"""The training recipe (``recipe``: setup, the loop, the outputs) and its components: the random
streams (``streams``) and each example's draws (``batches``), images and captions as tensors
(``augment``, ``buckets``, ``inputs``, ``text``), the loss (``objective``, ``loss``,
``attention``), what a run adds and writes (``adapters``, ``outputs``, ``prior``,
``held_out``), checkpoints, the lr schedule and the resume contract (``checkpoints``,
``schedule``, ``resume``)."""
