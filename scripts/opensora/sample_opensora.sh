#!/usr/bin/env bash
# The original sample script's command line. Point the three paths at your local downloads.
set -euo pipefail
python "$(dirname "$0")/sample_opensora.py" \
    --model_time_scale 1 \
    --model_space_scale 1 \
    --image_size 512 512 \
    --num_frames 16 \
    --fps 8 \
    --dtype fp16 \
    --model_pretrained_path ${MODEL:-./pretrained_models/OpenSora-v1-HQ-16x512x512.pth} \
    --text_pretrained_path ${T5:-./pretrained_models/t5_ckpts} \
    --vae_pretrained_path ${VAE:-./pretrained_models/sd-vae-ft-ema} \
    --prompt_path ${PROMPTS:-./assets/texts/t2v_samples.txt} \
    --save_dir ${SAVE_DIR:-./samples} \
    "$@"
