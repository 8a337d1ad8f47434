"""Frozen encoders: text (T5, MiniLM), caption cleaning, and video VAEs (per-frame AutoencoderKL, pixel)."""

from opendit.encoders.caption import clean_caption
from opendit.encoders.text import (
    FusedT5RMSNorm,
    MiniLMEncoder,
    T5Encoder,
    T5SDPASelfAttention,
    apply_t5_speedup,
    as_dtype,
    load_text_encoder,
    minilm_folder,
)
from opendit.encoders.vae import PixelVAE, VideoAutoencoderKL, load_vae

__all__ = [
    "FusedT5RMSNorm",
    "MiniLMEncoder",
    "PixelVAE",
    "T5Encoder",
    "T5SDPASelfAttention",
    "VideoAutoencoderKL",
    "apply_t5_speedup",
    "as_dtype",
    "clean_caption",
    "load_text_encoder",
    "load_vae",
    "minilm_folder",
]
