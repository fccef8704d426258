"""Scoring any run: CLIP text and image alignment and DINO image alignment of its images
(``alignment``), generated, kept and scored by ``runs`` (``sai-eval``). The miniature world's
judge is that world's own scorer (``sai_diffusion.miniature.evaluate``)."""
