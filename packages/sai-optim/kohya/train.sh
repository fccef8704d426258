#!/usr/bin/env bash
# kohya sd-scripts' train_network.py on the CPU: SD 1.5 (random weights), LoRA rank 4 on the
# text encoder and the U-Net, 64 px, batch 1, a state saved after every step.
#
#     bash packages/sai-optim/kohya/train.sh OUT OPTIMIZER_TYPE STEPS [train_network.py flags]
#
# KOHYA (default /tmp/sd-scripts), VENV (/tmp/kohya-venv) and RUN (/tmp/kohya-run, made by
# make_inputs.py) say where things are. Single-threaded and niced: the machine is shared.
set -euo pipefail
out=$1 optimizer=$2 steps=$3
shift 3
run=${RUN:-/tmp/kohya-run}
cd "${KOHYA:-/tmp/sd-scripts}"
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 19 "${VENV:-/tmp/kohya-venv}/bin/python" train_network.py \
  --pretrained_model_name_or_path "$run/sd15_random.safetensors" \
  --tokenizer_cache_dir "$run/tokenizers" \
  --train_data_dir "$run/data" --caption_extension .txt --resolution 64 \
  --train_batch_size 1 --max_data_loader_n_workers 0 --cache_latents \
  --network_module networks.lora --network_dim 4 --network_alpha 4 \
  --optimizer_type "$optimizer" \
  --learning_rate 1e-2 --unet_lr 1e-2 --text_encoder_lr 1e-3 --lr_scheduler constant \
  --max_train_steps "$steps" --save_every_n_steps 1 --save_state \
  --mixed_precision no --seed 1 \
  --output_dir "$out" --output_name lora --save_model_as safetensors "$@"
