"""Fused ops for STDiT: Triton kernels on CUDA, a pure-torch reference everywhere else.

Nothing here imports Triton at import time; each fast path falls back to torch automatically (see
``docs/kernels.md`` for what is fused, the dispatch rules and the numerics).
"""

from opendit.kernels.attention import attention, sdpa_backends, sdpa_context, varlen_cross_attention
from opendit.kernels.layernorm import (
    kernel_available,
    layer_norm,
    layernorm_modulate,
    layernorm_modulate_reference,
    set_interpret,
)

__all__ = [
    "attention",
    "kernel_available",
    "layer_norm",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "sdpa_backends",
    "sdpa_context",
    "set_interpret",
    "varlen_cross_attention",
]
