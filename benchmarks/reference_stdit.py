"""The original Open-Sora v1.0 STDiT forward, kept only as the speed reference for `bench_stdit.py`.

A faithful port of `opensora/models/stdit/stdit.py` (Mar 2024) computation order: LayerNorm modules,
separate `t2i_modulate`, einops rearranges, self-attention with the math of its flash-attn path, and
cross-attention over the whole batch flattened into one sequence with a block-diagonal mask (what its
xformers `BlockDiagonalMask` call computes), all served by PyTorch SDPA because flash-attn / xformers do not
install here. It shares parameter names with `opendit.models.STDiT`, so both load the same state dict and
`tests/test_reference_stdit.py` checks that they compute the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from opendit.models import STDiT
from opendit.models.layers import sincos_pos_embed


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def self_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qkv = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(x.transpose(1, 2).reshape(B, N, C))


def cross_attention(ca: nn.Module, x: torch.Tensor, cond: torch.Tensor, y_lens: list[int]) -> torch.Tensor:
    """The original: queries of all samples and the packed captions in ONE sequence, block-diagonal mask."""
    B, N, C = x.shape
    q = ca.q_linear(x).view(1, -1, ca.num_heads, ca.head_dim).transpose(1, 2)  # (1, H, B*N, d)
    kv = ca.kv_linear(cond).view(1, -1, 2, ca.num_heads, ca.head_dim)
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # (1, H, sum(L), d)
    q_ids = torch.arange(B, device=x.device).repeat_interleave(N)
    k_ids = torch.repeat_interleave(torch.arange(B, device=x.device), torch.tensor(y_lens, device=x.device))
    mask = q_ids[:, None] == k_ids[None, :]  # (B*N, sum(L)) block diagonal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return ca.proj(out.transpose(1, 2).reshape(B, N, C))


class ReferenceSTDiT(nn.Module):
    """Wraps an `STDiT` (for its parameters) and runs the original's forward over them."""

    def __init__(self, model: STDiT):
        super().__init__()
        self.model = model
        C = model.hidden_size
        self.norm = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.grad_checkpoint = False

    def block_forward(self, block, x, y, t0, y_lens, T, S, tpe):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + t0.reshape(B, 6, -1)
        ).chunk(6, dim=1)
        x_m = t2i_modulate(self.norm(x), shift_msa, scale_msa)
        x_s = rearrange(x_m, "B (T S) C -> (B T) S C", T=T, S=S)
        x_s = rearrange(self_attention(block.attn, x_s), "(B T) S C -> B (T S) C", T=T, S=S)
        x = x + gate_msa * x_s
        x_t = rearrange(x, "B (T S) C -> (B S) T C", T=T, S=S)
        if tpe is not None:
            x_t = x_t + tpe
        x_t = rearrange(self_attention(block.attn_temp, x_t), "(B S) T C -> B (T S) C", T=T, S=S)
        x = x + gate_msa * x_t
        x = x + cross_attention(block.cross_attn, x, y, y_lens)
        return x + gate_mlp * block.mlp(t2i_modulate(self.norm(x), shift_mlp, scale_mlp))

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
        for i, block in enumerate(m.blocks):
            args = (block, x, y, t0, y_lens, T, S, tpe_full if i == 0 else None)
            if self.grad_checkpoint and self.training:
                x = checkpoint(self.block_forward, *args, use_reentrant=False)
            else:
                x = self.block_forward(*args)
        x = m.final_layer(x, t)
        return m.unpatchify(x, T, H, W).float()
