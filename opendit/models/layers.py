"""Building blocks of STDiT: attention, MLP, embedders and sin-cos positional embeddings.

Module and parameter names follow Open-Sora v1.0 exactly, so released checkpoints load without a key map.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from opendit.kernels.attention import attention, sdpa_backends


def approx_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


#################################################################################
#                                Attention layers                               #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention over the token axis of (B, N, C), computed by PyTorch SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, enable_flashattn: bool | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # None lets SDPA pick (flash/cuDNN on GPU already); True/False pin the preference (see kernels/attention.py)
        self.backends = None if enable_flashattn is None else sdpa_backends(enable_flashattn)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        x = attention(q, k, v, backend=self.backends)  # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(x)


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to the text tokens of their own sample (keys beyond each caption's length masked).

    The original flattens the whole batch into one sequence; without a mask it lets every sample attend to
    every other sample's caption. Here attention is always per sample.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"hidden_size {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) image tokens; cond (B, L, C) caption tokens; attn_mask (B, 1, 1, L) bool key mask."""
        B, N, C = x.shape
        L = cond.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        kv = self.kv_linear(cond).view(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        x = attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """timm's Mlp (fc1 -> act -> fc2), kept for its parameter names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = approx_gelu()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with p == 0)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


#################################################################################
#                                   Embedders                                   #
#################################################################################


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) video latents -> (B, N, D) patch tokens, N = T/pt * H/ph * W/pw in (t, h, w) order."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> vectors: sinusoidal frequencies then a 2-layer MLP (as DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(dtype)
        return self.mlp(t_freq)  # (B, D)


class CaptionEmbedder(nn.Module):
    """Projects text-encoder states to the model width; holds the learned null caption used for CFG.

    `y_embedding` is a buffer (not a parameter) in the original, and is saved in its checkpoints.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_features=in_channels, hidden_features=hidden_size, out_features=hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace whole captions by the null caption (for classifier-free guidance training)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids[:, None, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if caption.shape[2:] != self.y_embedding.shape:
            raise ValueError(
                f"caption states have shape {tuple(caption.shape)}, the model expects (B, 1, "
                f"{self.y_embedding.shape[0]}, {self.y_embedding.shape[1]}) (model_max_length, caption_channels)"
            )
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)  # (B, 1, L, D)


#################################################################################
#                       Sine/cosine positional embeddings                       #
#################################################################################
# Straight from Open-Sora v1.0 (itself from MAE), numpy float64 then float32, so the
# numbers match checkpoints trained with it.


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """(H*W, D) embedding for a (H, W) grid; the first half of D encodes the w coordinate (original quirk)."""
    grid_h = np.arange(grid_size[0], dtype=np.float32) / scale
    grid_w = np.arange(grid_size[1], dtype=np.float32) / scale
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # (2, H, W), w first
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed(embed_dim: int, length: int, scale: float = 1.0) -> np.ndarray:
    pos = np.arange(0, length)[..., None] / scale
    return get_1d_sincos_pos_embed_from_grid(embed_dim, pos)


# Bucketed training (--bucket_config) meets one spatial grid per resolution x aspect ratio (6 x 9 in a full
# Open-Sora 1.2 table) and one temporal length per frame count: all of them stay cached.
@lru_cache(maxsize=128)
def _pos_embed_cpu(kind: str, embed_dim: int, size: tuple[int, ...], scale: float) -> torch.Tensor:
    if kind == "spatial":
        emb = get_2d_sincos_pos_embed(embed_dim, size, scale=scale)
    else:
        emb = get_1d_sincos_pos_embed(embed_dim, size[0], scale=scale)
    return torch.from_numpy(emb).float().unsqueeze(0)  # (1, M, D)


def sincos_pos_embed(
    kind: str, embed_dim: int, size: tuple[int, ...], scale: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Cached (1, M, D) spatial ('spatial', size=(h, w)) or temporal ('temporal', size=(t,)) embedding."""
    return _pos_embed_cpu(kind, embed_dim, tuple(size), float(scale)).to(device=device, dtype=dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN-single modulation (Open-Sora's `t2i_modulate`)."""
    return x * (1 + scale) + shift


__all__ = [
    "Attention",
    "MultiHeadCrossAttention",
    "Mlp",
    "DropPath",
    "PatchEmbed3D",
    "TimestepEmbedder",
    "CaptionEmbedder",
    "sincos_pos_embed",
    "modulate",
]
