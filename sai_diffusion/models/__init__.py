"""The diffusers and peft objects a run works on: the base model loaded from whatever the user
points at (``base``), the LoRA adapters (``lora``) and concept tokens (``tokens``) added to it,
and image generation with fixed seeds (``sampling``)."""
