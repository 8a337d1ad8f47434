"""Attention through PyTorch's ``scaled_dot_product_attention`` with an explicit backend preference.

There is no flash-attn / xformers dependency: SDPA ships flash, cuDNN and memory-efficient kernels with torch,
and the math backend is always allowed as the last resort, so a backend that cannot take some input (a mask,
an odd head dim, fp32, an old GPU) degrades to a slower kernel instead of raising.

- :func:`sdpa_backends` — the ordered backend list for ``enable_flashattn``;
- :func:`attention` — SDPA on (B, H, N, d) tensors, optionally restricted to those backends;
- :func:`varlen_cross_attention` — image tokens attending to per-sample captions of different lengths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["attention", "key_padding_mask", "sdpa_backends", "sdpa_context", "varlen_cross_attention"]

Backends = SDPBackend | Sequence[SDPBackend]


def sdpa_backends(enable_flashattn: bool) -> list[SDPBackend]:
    """The SDPA backends to allow, most preferred first.

    ``True``: flash, cuDNN, memory-efficient, then math (the fused kernels are CUDA-only; on CPU torch picks its
    own flash CPU kernel or math). ``False``: math only — the plain ``softmax(q k^T) v`` of the reference
    implementation, for debugging and numerics comparisons (it materialises the N x N attention matrix).
    """
    if enable_flashattn:
        return [
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
    return [SDPBackend.MATH]


def sdpa_context(enable_flashattn: bool) -> contextlib.AbstractContextManager[None]:
    """``sdpa_kernel`` context restricting SDPA to :func:`sdpa_backends` in that order of priority."""
    return sdpa_kernel(sdpa_backends(enable_flashattn), set_priority=True)


@contextlib.contextmanager
def _backend_context(backend: Backends | None) -> Iterator[None]:
    if backend is None:
        yield
        return
    backends = [backend] if isinstance(backend, SDPBackend) else list(backend)
    with sdpa_kernel(backends, set_priority=True):
        yield


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: Backends | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` via ``F.scaled_dot_product_attention``.

    Args:
        q: (B, H, N, d); k, v: (B, H, L, d).
        attn_mask: boolean (True = attend) or additive float mask broadcastable to (B, H, N, L).
        dropout_p: attention dropout probability (pass 0.0 in eval).
        backend: an ``SDPBackend`` or an ordered list (e.g. :func:`sdpa_backends`); None lets torch choose.
        scale: softmax scale, default ``d ** -0.5``.

    Returns:
        (B, H, N, d).
    """
    with _backend_context(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def key_padding_mask(kv_lens: torch.Tensor | Sequence[int], device: torch.device | str) -> tuple[int, torch.Tensor | None]:
    """Trim length and key mask for captions whose valid tokens come first.

    Returns ``max_len``, the longest caption (keys past it are never needed), and a boolean (B, 1, 1, max_len)
    mask (True = attend), or None when every caption has that length (SDPA may then pick flash, which takes
    no mask). Lengths are read on the host once: call this once per forward, not once per layer. A length of
    0 counts as 1, so no softmax row is all ``-inf`` (NaN); the caller decides what an empty caption means.
    """
    lens = torch.as_tensor(kv_lens).detach().to("cpu", torch.long)
    if bool((lens < 0).any()):
        raise ValueError(f"kv_lens must lie in [0, max length], got {lens.tolist()}")
    lens = lens.clamp(min=1)
    max_len = int(lens.max())
    if bool((lens == max_len).all()):
        return max_len, None
    key_pos = torch.arange(max_len)
    return max_len, (key_pos < lens[:, None])[:, None, None, :].to(device)  # (B, 1, 1, L')


def varlen_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | Sequence[int],
    dropout_p: float = 0.0,
    backend: Backends | None = None,
) -> torch.Tensor:
    """Cross attention where sample ``b`` attends only to its first ``kv_lens[b]`` keys.

    Equivalent to looping over samples with exact-length keys, computed in one SDPA call: keys are trimmed to
    ``max(kv_lens)`` (padding beyond the longest caption of the batch is never computed) and a boolean
    key-padding mask of shape (B, 1, 1, L') hides the rest.

    A sample with ``kv_lens[b] == 0`` has nothing to attend to: its output is zero (the cross-attention
    branch then adds nothing to the residual stream). Internally it attends to one key and the result is
    multiplied by 0, so neither the output nor the gradients can be NaN (an all-False mask row gives
    ``softmax`` of all ``-inf`` = NaN).

    Args:
        q: (B, H, N, d) image tokens.
        k, v: (B, H, L, d) text tokens padded to L; the valid tokens of each sample are a prefix (as with the
            T5 attention mask, where ``kv_lens = mask.sum(1)``).
        kv_lens: (B,) number of valid keys per sample, a tensor or a list of ints. A tensor costs one
            device-to-host sync to read its maximum.
        dropout_p, backend: as in :func:`attention`.

    Returns:
        (B, H, N, d).
    """
    b, _, length, _ = k.shape
    if b == 0:
        return q.new_empty(q.shape[:-1] + v.shape[-1:])
    lens_host = torch.as_tensor(kv_lens).detach().to("cpu", torch.long)
    if lens_host.shape != (b,):
        raise ValueError(f"kv_lens must have shape ({b},), got {tuple(lens_host.shape)}")
    if bool((lens_host > length).any()):
        raise ValueError(f"kv_lens must lie in [0, {length}], got {lens_host.tolist()}")
    has_empty = bool((lens_host == 0).any())
    max_len, attn_mask = key_padding_mask(lens_host, q.device)
    k, v = k[:, :, :max_len], v[:, :, :max_len]  # (B, H, L', d)
    out = attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, backend=backend)
    if has_empty:
        keep = (lens_host > 0).to(device=out.device, dtype=out.dtype)
        out = out * keep[:, None, None, None]
    return out
