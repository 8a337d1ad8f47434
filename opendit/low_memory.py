"""Sampling on small GPUs: keep only the module in use on the GPU (``--offload``) and decode in tiles
(``--vae_tiling``, `VideoAutoencoderKL.set_tiling`). docs/low_memory.md has the memory table.

    pipe = STDiTPipeline.from_pretrained(...)
    pipe.enable_offload("model")   # text encoder -> STDiT -> VAE, each moved to the GPU when it runs

``text``: the text encoder is moved to the GPU to encode the prompts and back to the CPU right after, so the
denoising never shares memory with it (T5-XXL: 9.5 GB in bf16); ``opendit sample`` does better still and frees
it before the STDiT loads. ``model``: accelerate's ``cpu_offload_with_hook`` chain (as diffusers'
``enable_model_cpu_offload``): each module is moved to the GPU when it runs and the previous one back to the CPU,
so the peak is the largest single module plus activations, at the cost of one host-to-device copy per module
per video.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["OFFLOAD_MODES", "enable_offload"]

OFFLOAD_MODES = ("none", "text", "model")


def _hook(module: nn.Module, device: torch.device, prev=None):  # noqa: ANN001, ANN202 -- accelerate's hook
    from accelerate import cpu_offload_with_hook

    return cpu_offload_with_hook(module, execution_device=device, prev_module_hook=prev)[1]


class _Offloaded:
    """A text encoder or VAE whose module is moved to the GPU just before ``method`` runs and back to the CPU
    right after; every other attribute is the wrapped object's."""

    def __init__(self, inner: Any, module: nn.Module, hook, method: str) -> None:  # noqa: ANN001
        self._inner, self._module, self._hook, self._method = inner, module, hook, method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        self._hook.hook.pre_forward(self._module)  # onto the GPU (and the previous module of the chain off it)
        try:
            return getattr(self._inner, self._method)(*args, **kwargs)
        finally:
            self._hook.offload()  # back to the CPU

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)


def enable_offload(pipe, mode: str, device: torch.device | str | None = None) -> None:  # noqa: ANN001
    """Offload ``pipe``'s modules to the CPU between uses (``mode``: none, text, model); ``device``: where they
    run (default: where the STDiT is now)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    if mode == "none":
        return
    device = torch.device(device) if device is not None else pipe.device
    pipe.execution_device = device  # the pipeline's device while the STDiT's weights sit on the CPU
    enc = pipe.text_encoder
    if enc is not None and not isinstance(enc, _Offloaded):
        pipe.text_encoder = _Offloaded(enc, enc.model, _hook(enc.model, device), "encode")
    if mode == "text":
        return
    model_hook = _hook(pipe.model, device)  # moved on its first forward, stays for all the steps
    vae = pipe.vae
    module = getattr(vae, "module", None)
    if isinstance(module, nn.Module) and not isinstance(vae, _Offloaded):  # (the pixel VAE has no weights)
        pipe.vae = _Offloaded(vae, module, _hook(module, device, prev=model_hook), "decode")


def set_vae_tiling(vae, enabled: bool | None, tile_size: int = 256) -> None:  # noqa: ANN001 -- any VAE
    """``--vae_tiling``: on, off, or None (automatic on CUDA, by the estimated decode memory); a VAE without
    weights (pixel) has nothing to tile."""
    if hasattr(vae, "set_tiling"):
        vae.set_tiling(enabled, tile_size)
