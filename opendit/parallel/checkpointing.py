"""Activation checkpointing and compilation of the transformer blocks, applied from outside the model.

Both keep the module tree and parameter names untouched (no ``_checkpoint_wrapped_module.`` or
``_orig_mod.`` prefixes), so state dicts, EMA copies and checkpoints look the same whatever is enabled.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):  # noqa: ANN001, ANN202 -- wraps any module forward
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # Non-reentrant checkpointing: works with keyword arguments, with inputs that need no grad, and under
        # FSDP2 and torch.compile. It replays the RNG state, so drop-path masks are the same in the recompute.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapped


def apply_activation_checkpointing(model: nn.Module, ratio: float = 1.0) -> nn.Module:
    """Recompute each block's activations in the backward instead of storing them (``--grad_checkpoint``).

    Saves most activation memory (about 1/depth is kept) for about one extra forward pass of compute.
    ``ratio`` (``--grad_checkpoint_ratio``): only the first ``round(ratio * depth)`` blocks are checkpointed, the
    others keep their activations -- memory traded for speed, linearly in the ratio.
    """
    for block in list(model.blocks)[:round(ratio * len(model.blocks))]:
        block.forward = _checkpointed(block.forward)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """``torch.compile`` each block in place (``--compile``).

    Blocks rather than the whole model: they are identical, so one compiled graph is reused ``depth`` times,
    and FSDP2's per-block hooks stay outside the graph.
    """
    for block in model.blocks:
        block.compile()
    return model
