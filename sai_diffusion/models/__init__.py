"""The diffusers and peft objects a run works on: the base model loaded from whatever the user
points at (``base``) and what differs between model families (``family``), the LoRA adapters
(``lora``), concept tokens (``tokens``) and ED-LoRA's layer-wise words (``edlora``) added to it,
finished runs loaded for drawing (``inference``), and image generation with fixed seeds
(``sampling``)."""
