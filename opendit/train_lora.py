"""`opendit train` on small GPUs: LoRA fine-tuning (peft), the 8-bit AdamW, and the checks of their flags.

    opendit train ... --model_pretrained_path base.pth --lora_rank 16 --grad_checkpoint     # adapters only
    opendit sample --model_pretrained_path base/ --lora outputs/000-.../epoch0-global_step1000/lora

With ``--lora_rank`` the base weights are frozen and cast to the training dtype (no fp32 master copy, no
optimizer state, no gradient), the adapters train in fp32; checkpoints' ``model/``, ``optimizer/`` and ``ema.pt``
hold the adapters only (``opendit.checkpoint``'s ``trained_only``), and each checkpoint also gets ``lora/``: the
EMA adapters as a peft folder, what ``opendit sample --lora`` and ``opendit export --merge_lora`` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from opendit.models.lora import attach_lora, lora_file_state, save_lora_folder

__all__ = ["check_low_memory_flags", "setup_lora", "build_optimizer", "lora_writer"]


def check_low_memory_flags(cfg) -> None:  # noqa: ANN001 -- a TrainConfig
    """One-line errors for the flags of this module (called by ``TrainConfig.__post_init__``)."""
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {cfg.lora_rank}")
    if cfg.lora_rank is None and (cfg.lora_alpha is not None or cfg.lora_targets):
        raise ValueError("--lora_alpha/--lora_targets need --lora_rank")
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {cfg.lora_alpha}")
    if cfg.lora_rank is not None and cfg.freeze is not None:
        raise ValueError("--freeze and --lora_rank together: LoRA already freezes every base weight")
    if not 0.0 <= cfg.grad_checkpoint_ratio <= 1.0:
        raise ValueError(f"--grad_checkpoint_ratio must be in [0, 1], got {cfg.grad_checkpoint_ratio}")
    if cfg.optimizer == "adamw8bit":
        _bitsandbytes()  # the package and CUDA, before anything loads


def _bitsandbytes():  # noqa: ANN202 -- the bitsandbytes module
    if not torch.cuda.is_available():
        raise ValueError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit kernels); use adamw on the CPU")
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def setup_lora(model: nn.Module, cfg, dtype: torch.dtype):  # noqa: ANN001, ANN201 -- TrainConfig -> LoraConfig
    """Attach the trainable adapters (after the base weights are loaded, before parallelize)."""
    return attach_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, base_dtype=dtype)


def build_optimizer(params: list[nn.Parameter], cfg, device: torch.device) -> torch.optim.Optimizer:  # noqa: ANN001
    """AdamW (weight decay 0, as the original), or bitsandbytes' AdamW8bit (states in 8 bits: 2 bytes per
    parameter instead of 8)."""
    if cfg.optimizer == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(params, lr=cfg.lr, weight_decay=0.0)
    # the fused CUDA kernel updates all (sharded) parameters in a few launches
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")


def lora_writer(config, base_model: str | None) -> Callable[[Path, dict], None]:  # noqa: ANN001 -- LoraConfig
    """What ``save_train_state`` calls on rank 0 with the checkpoint folder (still ``.tmp``) and the whole EMA:
    writes ``lora/``, the EMA adapters as a peft folder."""
    def write(folder: Path, ema_state: dict[str, torch.Tensor]) -> None:
        save_lora_folder(folder / "lora", lora_file_state(ema_state), config, base_model)

    return write
