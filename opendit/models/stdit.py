"""STDiT: the spatial-temporal diffusion transformer of Open-Sora v1.0, read top to bottom.

Each block: spatial self-attention within a frame, temporal self-attention across frames, cross-attention to
text tokens, MLP; all modulated adaLN-single style by the timestep. Parameter names equal the released
checkpoints'. Differences from the original, all deliberate:
- positional embeddings are computed for the size of the input, so any latent size divisible by the patch
  works (the original froze them at `input_size`); they are not buffers and never appear in a state dict;
- cross-attention is per sample (the original mixes captions across the batch when `mask is None`);
- inside the blocks activations keep the shape (B, T, S, C), so sequence parallelism can re-shard
  T or S from outside (`opendit.parallel`) without touching this file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from opendit.kernels import layernorm_modulate
from opendit.kernels.attention import key_padding_mask
from opendit.models.layers import (
    Attention,
    CaptionEmbedder,
    DropPath,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed,
)


#################################################################################
#                                     Config                                    #
#################################################################################


@dataclass
class STDiTConfig:
    """Constructor keywords of STDiT (the original's names)."""

    input_size: tuple[int, int, int] = (16, 32, 32)  # latent (T, H, W) the model was trained at
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # probability of the null caption in training (for CFG)
    pred_sigma: bool = True  # predict the variance interpolation too (out_channels = 2 * in_channels)
    drop_path: float = 0.0
    no_temporal_pos_emb: bool = False
    # Where frame positions enter: "first_block" (Open-Sora v1.0: added to the first block's temporal-attention
    # input only) or "input" (added to every token with the spatial positions, as Latte does).
    temporal_pos: str = "first_block"
    caption_channels: int = 4096  # text encoder width (T5-XXL: 4096)
    model_max_length: int = 120  # text tokens
    space_scale: float = 1.0  # divides spatial positions (0.5 for 256px checkpoints, 1.0 for 512px)
    time_scale: float = 1.0  # divides temporal positions
    freeze: str | None = None  # None | "not_temporal" | "text"
    enable_flashattn: bool | None = None  # None: let SDPA choose; True: prefer flash/cuDNN; False: math
    enable_layernorm_kernel: bool | None = None  # None: fused Triton kernel when on CUDA
    enable_modulate_kernel: bool | None = None  # fused LayerNorm + modulate (same switch family)
    # None: the original initialisation of the text path (caption projection std 0.02, cross-attention output
    # zero). A number g: xavier with gain g for the caption projection and cross-attention q/kv, and a non-zero
    # (xavier) cross-attention output, so that words which only say *where* (left/right) can be learned at all
    # (docs/demo_model.md). Loaded weights replace it, except those --model_pretrained_skip leaves out.
    text_init_gain: float | None = None

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)
        self.patch_size = tuple(int(v) for v in self.patch_size)
        if len(self.input_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"input_size and patch_size must have 3 entries (T, H, W): {self.input_size}, {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        patch_values = self.patch_size[0] * self.patch_size[1] * self.patch_size[2] * self.in_channels
        if self.hidden_size < patch_values:
            # Each token must carry its patch's noise through the network: a narrower model cannot (its noise
            # prediction error stays near 1 - hidden/values however long it trains).
            warnings.warn(f"hidden_size {self.hidden_size} is smaller than the {patch_values} values of a patch "
                          f"({'x'.join(map(str, self.patch_size))} x {self.in_channels} channels): the model cannot "
                          "represent per-pixel noise; use a smaller patch or a wider model", stacklevel=3)
        if self.temporal_pos not in ("first_block", "input"):
            raise ValueError(f"temporal_pos must be 'first_block' or 'input', got {self.temporal_pos!r}")
        if self.text_init_gain is not None and not self.text_init_gain > 0:
            raise ValueError(f"text_init_gain must be a positive number or None, got {self.text_init_gain!r}")
        if self.freeze not in (None, "not_temporal", "text"):
            raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {self.freeze!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "STDiTConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown STDiT config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"], d["patch_size"] = list(self.input_size), list(self.patch_size)
        return d


#################################################################################
#                                 STDiT block                                   #
#################################################################################


class STDiTBlock(nn.Module):
    def __init__(self, config: STDiTConfig, drop_path: float = 0.0):
        super().__init__()
        C = config.hidden_size
        self.use_modulate_kernel = config.enable_modulate_kernel or config.enable_layernorm_kernel
        self.attn = Attention(C, config.num_heads, qkv_bias=True, enable_flashattn=config.enable_flashattn)
        self.cross_attn = MultiHeadCrossAttention(C, config.num_heads)
        self.mlp = Mlp(in_features=C, hidden_features=int(C * config.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)
        self.attn_temp = Attention(C, config.num_heads, qkv_bias=True, enable_flashattn=config.enable_flashattn)

    def norm_modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # LayerNorm (no affine, eps 1e-6) then adaLN modulation: fused on CUDA, torch elsewhere.
        return layernorm_modulate(x, shift, scale, eps=1e-6, use_kernel=self.use_modulate_kernel)

    def spatial(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        B, T, S, C = x.shape
        x_s = self.norm_modulate(x.reshape(B, T * S, C), shift, scale)  # (B, T*S, C)
        x_s = self.attn(x_s.reshape(B * T, S, C)).reshape(B, T, S, C)  # attention within each frame
        return x + self.drop_path(gate[:, None] * x_s)

    def temporal(self, x: torch.Tensor, gate: torch.Tensor, tpe: torch.Tensor | None) -> torch.Tensor:
        # Note: the original feeds the un-normalised x to temporal attention and re-uses the spatial gate.
        B, T, S, C = x.shape
        x_t = x.transpose(1, 2).reshape(B * S, T, C)  # (B*S, T, C): one sequence per pixel track
        if tpe is not None:
            x_t = x_t + tpe
        x_t = self.attn_temp(x_t).reshape(B, S, T, C).transpose(1, 2)  # (B, T, S, C)
        return x + self.drop_path(gate[:, None] * x_t)

    def cross_mlp(
        self, x: torch.Tensor, y: torch.Tensor, cross_mask: torch.Tensor | None,
        shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
    ) -> torch.Tensor:
        B, T, S, C = x.shape
        x = x.reshape(B, T * S, C)
        x = x + self.cross_attn(x, y, cross_mask)
        x = x + self.drop_path(gate * self.mlp(self.norm_modulate(x, shift, scale)))
        return x.reshape(B, T, S, C)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor,
        cross_mask: torch.Tensor | None = None, tpe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, S, C); y (B, L, C) projected captions; t0 (B, 6C) timestep modulation; cross_mask
        (B, 1, 1, L) bool caption-key mask or None; tpe (1, T, C) temporal positions (first block only)."""
        B = x.shape[0]
        mods = self.scale_shift_table[None] + t0.reshape(B, 6, -1)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # each (B, 1, C)
        x = self.spatial(x, shift_msa, scale_msa, gate_msa)
        x = self.temporal(x, gate_msa, tpe)
        return self.cross_mlp(x, y, cross_mask, shift_mlp, scale_mlp, gate_mlp)


#################################################################################
#                                  Final layer                                  #
#################################################################################


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # each (B, 1, C)
        x = nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
        return self.linear(modulate(x, shift, scale))  # (B, N, prod(patch) * C_out)


#################################################################################
#                                     STDiT                                     #
#################################################################################


class STDiT(nn.Module):
    def __init__(self, config: STDiTConfig | None = None, dtype: torch.dtype | None = None, **kwargs):
        """`STDiT(config)` or `STDiT(**keywords)` with the original's keyword names; `dtype` casts the weights."""
        super().__init__()
        if config is None:
            config = STDiTConfig.from_dict(kwargs)
        elif kwargs:
            raise ValueError("pass either a STDiTConfig or keywords, not both")
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.pred_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size

        C = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C, bias=True))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, C, uncond_prob=config.class_dropout_prob, token_num=config.model_max_length
        )
        dpr = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]  # stochastic depth ramp
        self.blocks = nn.ModuleList([STDiTBlock(config, drop_path=dpr[i]) for i in range(config.depth)])
        patch_volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.final_layer = T2IFinalLayer(C, patch_volume, self.out_channels)

        self.initialize_weights()
        if config.freeze == "not_temporal":
            self.freeze_not_temporal()
        elif config.freeze == "text":
            self.freeze_text()
        if dtype is not None:
            self.to(dtype)

    @property
    def learn_sigma(self) -> bool:
        """Whether the output holds the learned variance after the prediction (``pred_sigma``: 2C channels)."""
        return self.config.pred_sigma

    # ----------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, T, H, W), timestep (B,), y (B, 1, L, C_text), mask (B, L) of 0/1 -> (B, C_out, T, H, W) fp32."""
        dtype = self.x_embedder.proj.weight.dtype
        x, y = x.to(dtype), y.to(dtype)
        B, _, T_in, H_in, W_in = x.shape
        pt, ph, pw = self.patch_size
        if T_in % pt or H_in % ph or W_in % pw:
            raise ValueError(f"latent size (T, H, W)=({T_in}, {H_in}, {W_in}) is not divisible by patch {self.patch_size}")
        T, H, W = T_in // pt, H_in // ph, W_in // pw

        x = self.x_embedder(x).view(B, T, H * W, -1)  # (B, T, S, C)
        x = x + self.spatial_pos_embed(H, W, x)[:, None]  # (1, 1, S, C) broadcast over frames

        t = self.t_embedder(timestep, dtype=dtype)  # (B, C)
        t0 = self.t_block(t)  # (B, 6C)
        y = self.y_embedder(y, self.training).squeeze(1)  # (B, L, C)
        cross_mask = None
        if mask is not None:
            if mask.shape[0] != y.shape[0]:
                # CFG batches: the null caption is masked like the prompt it replaces (as in training).
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            # Built once per forward (one host sync), not per block; valid caption tokens come first.
            max_len, cross_mask = key_padding_mask(mask.sum(dim=1), x.device)
            y = y[:, :max_len]  # padding past the longest caption never enters the K/V projections

        tpe = None if self.config.no_temporal_pos_emb else self.temporal_pos_embed(T, x)
        if tpe is not None and self.config.temporal_pos == "input":
            # Why: "first_block" positions reach the residual stream only through one attention average over
            # frames; a small model trained from scratch never learned frame order that way (its output did not
            # depend on the frame index, so it could not follow "moving left"). Here every layer sees it.
            x = x + tpe[:, :, None]  # (1, T, 1, C) broadcast over the frame's tokens
            tpe = None
        for i, block in enumerate(self.blocks):
            x = block(x, y, t0, cross_mask, tpe if i == 0 else None)  # temporal positions enter at block 0 only

        x = self.final_layer(x.flatten(1, 2), t)  # (B, N, prod(patch) * C_out)
        return self.unpatchify(x, T, H, W).float()

    def spatial_pos_embed(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        return sincos_pos_embed("spatial", self.hidden_size, (h, w), self.config.space_scale, like.device, like.dtype)

    def temporal_pos_embed(self, t: int, like: torch.Tensor) -> torch.Tensor:
        return sincos_pos_embed("temporal", self.hidden_size, (t,), self.config.time_scale, like.device, like.dtype)

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        B = x.shape[0]
        pt, ph, pw = self.patch_size
        C = self.out_channels
        x = x.view(B, T, H, W, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T, pt, H, ph, W, pw)
        return x.reshape(B, C, T * pt, H * ph, W * pw)

    # ---------------------------------------------------------- initialisation
    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # patch embedding like a Linear
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            # zero-init the residual branches that are new relative to an image model
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
            nn.init.constant_(block.attn_temp.proj.weight, 0)
            nn.init.constant_(block.attn_temp.proj.bias, 0)
        gain = self.config.text_init_gain
        if gain is not None:
            # Why: with a small caption projection and a zero output, every image token receives the same caption
            # vector; a word that moves the shape without changing how much of it there is then leaves the
            # token-summed loss unchanged and gets no gradient (a saddle). Large enough keys make attention depend
            # on the query's position, and a non-zero output lets that reach the residual stream from step one.
            layers = [self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
            layers += [m for b in self.blocks for m in (b.cross_attn.q_linear, b.cross_attn.kv_linear)]
            for layer in layers:
                nn.init.xavier_uniform_(layer.weight, gain=gain)
            for block in self.blocks:
                nn.init.xavier_uniform_(block.cross_attn.proj.weight)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def freeze_not_temporal(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_("attn_temp" in name)

    def freeze_text(self) -> None:
        for name, p in self.named_parameters():
            if "cross_attn" in name:
                p.requires_grad_(False)

    # ---------------------------------------------------- save / load folders
    def save_pretrained(self, folder: str, state_dict: dict | None = None) -> None:
        """diffusers-style folder: config.json + model.safetensors."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str, **overrides) -> "STDiT":
        """Build from `folder/config.json` (keys overridable) and load `folder/model.safetensors`."""
        from opendit.models.weights import load_checkpoint

        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in model folder {folder}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update(overrides)
        model = cls(STDiTConfig.from_dict(cfg))
        load_checkpoint(model, os.path.join(folder, "model.safetensors"))
        return model


#################################################################################
#                                  Size presets                                 #
#################################################################################

MODEL_PRESETS: dict[str, dict] = {
    "STDiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16),
    "STDiT-L/2": dict(depth=24, hidden_size=1024, patch_size=(1, 2, 2), num_heads=16),
    "STDiT-B/2": dict(depth=12, hidden_size=768, patch_size=(1, 2, 2), num_heads=12),
    "STDiT-S/2": dict(depth=12, hidden_size=384, patch_size=(1, 2, 2), num_heads=6),
    "STDiT-Tiny/2": dict(depth=2, hidden_size=64, patch_size=(1, 2, 2), num_heads=4),
}


def build_model(name: str, **kwargs) -> STDiT:
    """STDiT from a preset name plus any other constructor keyword (input_size, caption_channels, ...)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return STDiT(**{**MODEL_PRESETS[name], **kwargs})
