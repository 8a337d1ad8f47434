#!/usr/bin/env bash
# Fine-tune Open-Sora v1.0 (STDiT-XL/2) on a CSV of clips, on one node with 8 GPUs (the original's command).
#   bash scripts/opensora/train_opensora.sh
# Set the paths below (or export them) first. More in docs/training.md.
set -euo pipefail

NPROC=${NPROC:-8}
DATA=${DATA:-./videos/demo.csv}                                    # path,text rows
CKPT=${CKPT:-./pretrained_models/OpenSora-v1-HQ-16x512x512.pth}    # released checkpoint to start from
T5=${T5:-./pretrained_models/t5_ckpts}                             # holds t5-v1_1-xxl/
VAE=${VAE:-./pretrained_models/sd-vae-ft-ema}

torchrun --standalone --nproc_per_node "$NPROC" scripts/opensora/train_opensora.py \
    --batch_size 2 \
    --mixed_precision bf16 \
    --lr 2e-5 \
    --grad_checkpoint \
    --plugin zero2 \
    --data_path "$DATA" \
    --model_pretrained_path "$CKPT" \
    --text_pretrained_path "$T5" \
    --vae_pretrained_path "$VAE" \
    --num_frames 16 --image_size 512 512 --frame_interval 3 \
    --enable_flashattn --enable_layernorm_kernel --text_speedup \
    --outputs ./outputs "$@"

# Several nodes: run on every node, with its --node_rank (or use `opendit launch --hostfile ...`):
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 \
#       scripts/opensora/train_opensora.py ...same flags...
# Resume the newest checkpoint under --outputs: add `--load latest`.
