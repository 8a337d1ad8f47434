"""The original Open-Sora v1.0 STDiT forward, kept only as the speed reference for `bench_stdit.py`.

A port of `opensora/models/stdit/stdit.py` (Mar 2024) with the original's computation order and cost, run the
way its training configs run it (`enable_flashattn=True`, `enable_layernorm_kernel=True`):

- spatial and temporal self-attention: the original calls flash-attn; PyTorch SDPA (flash on CUDA) stands in;
- cross-attention: the original packs the batch's queries and captions into one sequence and calls xformers'
  `memory_efficient_attention` with `BlockDiagonalMask.from_seqlens([N] * B, y_lens)`, so each sample's N
  queries attend to its own L_b caption tokens (cost ∝ Σ_b N·L_b). Here: that same xformers call when xformers
  imports and runs on the device, else one SDPA call per sample over exactly its L_b tokens, no mask — the same
  cost. Never a dense (B·N) × ΣL mask. :func:`cross_attention_kernel` says which one runs;
- LayerNorm: the original's apex `FusedLayerNorm` runs in the autocast dtype (apex casts its input, then runs
  with autocast off); :func:`fused_layer_norm` does the same with torch's fused LayerNorm kernel;
- `t2i_modulate`, gates and einops rearranges are separate ops, as in the original.

It shares parameter names with `opendit.models.STDiT`, so both load the same state dict and
`tests/test_reference_stdit.py` checks that they compute the same numbers (and that no dense mask is built).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from opendit.models import STDiT
from opendit.models.layers import sincos_pos_embed

XFORMERS = "xformers memory_efficient_attention + BlockDiagonalMask (as the original)"
PER_SAMPLE_SDPA = "SDPA per sample over its own caption tokens (block-diagonal cost)"


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def fused_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """apex `FusedLayerNorm` (no affine) semantics: under autocast the input is cast to the autocast dtype and
    normalised with autocast off, so the output stays bf16/fp16 (torch's `nn.LayerNorm` would return fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, x.shape[-1:], eps=eps)
    return F.layer_norm(x, x.shape[-1:], eps=eps)


@lru_cache(maxsize=None)
def _xformers_status(device_type: str, dtype: torch.dtype) -> str | None:
    """None when xformers' memory-efficient attention runs on this device and dtype, else why not.

    A probe call, not just an import: a wheel built for another torch imports fine and then has no operator.
    """
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 4, 1, 8, device=device_type, dtype=dtype)
        bias = xops.fmha.BlockDiagonalMask.from_seqlens([2, 2], [1, 2])
        xops.memory_efficient_attention(q, q[:, :3], q[:, :3], attn_bias=bias)
    except Exception as err:  # ImportError, or NotImplementedError: no kernel for this device / dtype
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
    return None


def cross_attention_kernel(device_type: str, dtype: torch.dtype) -> tuple[str, str | None]:
    """The kernel the reference's cross-attention uses here, and why xformers is not used (None if it is)."""
    reason = _xformers_status(device_type, dtype)
    return (XFORMERS, None) if reason is None else (PER_SAMPLE_SDPA, reason)


def self_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qkv = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, N, d)
    x = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(x.transpose(1, 2).reshape(B, N, C))


def cross_attention(
    ca: nn.Module, x: torch.Tensor, cond: torch.Tensor, y_lens: list[int], kernel: str
) -> torch.Tensor:
    """The original: all queries (1, B*N) and the packed captions (1, ΣL); sample b sees only its L_b tokens."""
    B, N, C = x.shape
    q = ca.q_linear(x).view(1, B * N, ca.num_heads, ca.head_dim)
    k, v = ca.kv_linear(cond).view(1, -1, 2, ca.num_heads, ca.head_dim).unbind(2)  # each (1, ΣL, H, d)
    if kernel == XFORMERS:
        import xformers.ops as xops

        bias = xops.fmha.BlockDiagonalMask.from_seqlens([N] * B, y_lens)
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (1, B*N, H, d)
    else:
        out = torch.empty_like(q).view(B, N, ca.num_heads, ca.head_dim)
        keys = zip(k[0].split(y_lens), v[0].split(y_lens))  # sample b's (L_b, H, d)
        for b, (k_b, v_b) in enumerate(keys):
            q_b = q[0, b * N:(b + 1) * N].transpose(0, 1)[None]  # (1, H, N, d)
            o_b = F.scaled_dot_product_attention(q_b, k_b.transpose(0, 1)[None], v_b.transpose(0, 1)[None])
            out[b] = o_b[0].transpose(0, 1)  # (N, H, d)
    return ca.proj(out.reshape(B, N, C))


class ReferenceSTDiT(nn.Module):
    """Wraps an `STDiT` (for its parameters) and runs the original's forward over them."""

    def __init__(self, model: STDiT):
        super().__init__()
        self.model = model
        self.grad_checkpoint = False
        # (kernel, why xformers is not used) of the last forward, for the benchmark's printout
        self.cross_attn_kernel: tuple[str, str | None] | None = None

    def block_forward(self, block, x, y, t0, y_lens, T, S, tpe, kernel):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + t0.reshape(B, 6, -1)
        ).chunk(6, dim=1)
        x_m = t2i_modulate(fused_layer_norm(x), shift_msa, scale_msa)
        x_s = rearrange(x_m, "B (T S) C -> (B T) S C", T=T, S=S)
        x_s = rearrange(self_attention(block.attn, x_s), "(B T) S C -> B (T S) C", T=T, S=S)
        x = x + gate_msa * x_s
        x_t = rearrange(x, "B (T S) C -> (B S) T C", T=T, S=S)
        if tpe is not None:
            x_t = x_t + tpe
        x_t = rearrange(self_attention(block.attn_temp, x_t), "(B S) T C -> B (T S) C", T=T, S=S)
        x = x + gate_msa * x_t
        x = x + cross_attention(block.cross_attn, x, y, y_lens, kernel)
        return x + gate_mlp * block.mlp(t2i_modulate(fused_layer_norm(x), shift_mlp, scale_mlp))

    def forward(self, x, timestep, y, mask=None):
        m = self.model
        dtype = m.x_embedder.proj.weight.dtype
        x, y = x.to(dtype), y.to(dtype)
        B, _, Tin, Hin, Win = x.shape
        T, H, W = Tin // m.patch_size[0], Hin // m.patch_size[1], Win // m.patch_size[2]
        S = H * W
        x = m.x_embedder(x)
        x = rearrange(x, "B (T S) C -> B T S C", T=T, S=S)
        x = x + sincos_pos_embed("spatial", m.hidden_size, (H, W), m.config.space_scale, x.device, x.dtype)
        x = rearrange(x, "B T S C -> B (T S) C")
        t = m.t_embedder(timestep, dtype=x.dtype)
        t0 = m.t_block(t)
        y = m.y_embedder(y, self.training)
        if mask is not None:
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, x.shape[-1])
            y_lens = mask.sum(dim=1).tolist()
        else:
            y_lens = [y.shape[2]] * y.shape[0]
            y = y.squeeze(1).view(1, -1, x.shape[-1])
        tpe_full = sincos_pos_embed("temporal", m.hidden_size, (T,), m.config.time_scale, x.device, x.dtype)
        dev = x.device.type  # the queries come out of a Linear: in the autocast dtype when autocast is on
        q_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        self.cross_attn_kernel = cross_attention_kernel(dev, q_dtype)
        for i, block in enumerate(m.blocks):
            args = (block, x, y, t0, y_lens, T, S, tpe_full if i == 0 else None, self.cross_attn_kernel[0])
            if self.grad_checkpoint and self.training:
                x = checkpoint(self.block_forward, *args, use_reentrant=False)
            else:
                x = self.block_forward(*args)
        x = m.final_layer(x, t)
        return m.unpatchify(x, T, H, W).float()
