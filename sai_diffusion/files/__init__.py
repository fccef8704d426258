"""Files on disk: the run folder's layout and reading it back (``run_dir``), the LoRA and
embedding files other tools load (``lora_files``), and the original single-file (LDM) checkpoint
layout (``ldm``). Formats only: no training and no sampling here."""
