"""The built-in miniature world: a demo, and a yardstick, that runs on a CPU with no downloads.

    world        procedural captioned 32 px images whose content is known by construction
    judge        a small classifier that reads a generated image back into its scene
    model        the shipped tiny SD-1.5-architecture model (configs/miniature): finding it,
                 scoring it with the judge, drawing sample grids
    evaluate     sai-eval for miniature-world concepts: concept and prompt fidelity
    tiny         tiny SD-1.5-architecture pipelines with random weights (tests, pretraining)
    clip_vocab   CLIP's BPE vocabulary rebuilt offline (tiny tokenizers, the SD 1.5 config)

The real path never depends on it: outside this package only the entry points import it (the
base-model name ``miniature`` is resolved to ``_resources.miniature_dir()``, a folder like any
other).
"""

from .._resources import miniature_dir

__all__ = ["miniature_dir"]
