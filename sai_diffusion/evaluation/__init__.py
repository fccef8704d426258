"""Scoring any run: the one evaluator (``evaluator``: the run's images drawn, kept and handed to
scorers, ``sai-eval``) and CLIP text and image alignment and DINO image alignment
(``alignment``). The miniature world's judge is that world's own scorer
(``sai_diffusion.miniature.evaluate``)."""
