"""Reading model weights: released Open-Sora checkpoints, our own exports, safetensors.

Every load says what it loaded. A shape mismatch is an error naming the key and both shapes; missing and
unexpected keys are listed (users of the original code lost days to checkpoints that silently did not load).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

logger = logging.getLogger("opendit")

# Buffers recomputed from the input size: present in some checkpoints, never needed.
RECOMPUTED_KEYS = ("pos_embed", "pos_embed_temporal")
WRAPPER_KEYS = ("ema", "model", "state_dict", "module")
PREFIXES = ("module.", "_orig_mod.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model as configured."""


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.skipped)
        lines = [f"loaded {len(self.loaded)}/{total} tensors from {self.path}"]
        if self.missing:
            lines.append(f"  MISSING from the checkpoint ({len(self.missing)}, left at their initial values): {self.missing}")
        if self.unexpected:
            lines.append(f"  UNEXPECTED in the checkpoint ({len(self.unexpected)}, not used): {self.unexpected}")
        if self.skipped:
            lines.append(f"  SKIPPED as asked ({len(self.skipped)}, left at their initial values): {self.skipped}")
        if self.ignored:
            lines.append(f"  ignored recomputed buffers: {self.ignored}")
        return "\n".join(lines)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.pth/.pt/.bin/.safetensors), unwrapped from {"ema"|"model"|...} and
    with DDP/compile prefixes stripped. Loaded with `weights_only=True` (no code execution) and mmap."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        for name in ("model.safetensors", "ema.pt", "model.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"no model.safetensors / ema.pt in checkpoint folder {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) or k in RECOMPUTED_KEYS for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def load_state_dict_checked(model: nn.Module, sd: dict[str, torch.Tensor], path: str = "<state dict>",
                            skip: Sequence[str] = ()) -> LoadReport:
    """Copy `sd` into `model` after checking every key and shape; returns what happened. Model keys containing
    one of `skip` are not loaded (nor shape-checked) and keep their current values; a `skip` fragment that matches
    no key is an error (a typo must not silently load everything)."""
    own = model.state_dict()
    report = LoadReport(path)
    report.skipped = [k for k in own if any(s in k for s in skip)]
    unmatched = [s for s in skip if not any(s in k for k in report.skipped)]
    if unmatched:
        raise CheckpointError(f"skip pattern(s) {unmatched} match no parameter of the model")
    usable = {}
    for k, v in sd.items():
        if k in report.skipped:
            continue
        if k not in own:
            (report.ignored if k in RECOMPUTED_KEYS else report.unexpected).append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{path}: shape mismatch for '{k}': checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)} "
                "(does the model config — size preset, caption_channels, model_max_length, patch_size — fit the checkpoint?)"
            )
        else:
            usable[k] = v
    report.missing = [k for k in own if k not in usable and k not in report.skipped]
    report.loaded = list(usable)
    model.load_state_dict(usable, strict=False)
    return report


def load_checkpoint(model: nn.Module, path: str, allow_missing: bool = False, skip: Sequence[str] = ()) -> LoadReport:
    """Load a checkpoint file into `model`, logging what loaded. Raises CheckpointError on shape mismatches,
    and on missing keys unless `allow_missing` (e.g. fine-tuning a model with new layers). Keys containing one of
    `skip` (name fragments, e.g. "cross_attn") keep the model's initialisation: retraining part of a model, or a
    text encoder of another width."""
    report = load_state_dict_checked(model, read_state_dict(path), path, skip)
    logger.info(report.summary())
    if report.missing and not allow_missing:
        raise CheckpointError(report.summary() + "\n(the checkpoint does not fit this model configuration)")
    if not report.loaded:
        raise CheckpointError(f"{path}: no tensor of the checkpoint matches the model")
    return report
