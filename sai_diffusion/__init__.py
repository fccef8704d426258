"""sai-diffusion: LoRA fine-tuning of SD-1.5-class models with SGD-SaI (arXiv:2412.11768)."""

__version__ = "0.1.0"
