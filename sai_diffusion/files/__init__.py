"""Files on disk: the run folder's layout and reading it back (``run_dir``), a concept's images,
captions and masks (``concept_data``), the LoRA and embedding files other tools load
(``lora_files``, ``mix_of_show``), and the original single-file (LDM) checkpoint layout
(``ldm``). Formats only: no training and no sampling here."""
