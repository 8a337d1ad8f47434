"""Open-Sora v1.0 training with OpenDiT's flags (``scripts/opensora/train_opensora.py`` of the original).

A thin wrapper over ``opendit train`` (``opendit/train.py``), kept so existing command lines keep working::

    torchrun --standalone --nproc_per_node 8 scripts/opensora/train_opensora.py \
        --batch_size 2 --mixed_precision bf16 --lr 2e-5 --grad_checkpoint \
        --data_path ./videos/demo.csv --model_pretrained_path ./OpenSora-v1-HQ-16x512x512.pth

It also runs as a single process without torchrun. ``python scripts/opensora/train_opensora.py --help`` lists
the flags.
"""

from opendit.cli import exit_process
from opendit.train import main

if __name__ == "__main__":
    exit_process(main() or 0)
