"""Tiny random components written with `save_pretrained`, for tests that load them through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "a red car drives on a road",
    "a cat sits on a mat",
    "a dog runs in the park",
    "the ocean waves at sunset",
    "a person walks in the city at night",
]


def write_t5_tokenizer(folder: Path) -> None:
    """A tiny sentencepiece model + tokenizer_config.json: the files DeepFloyd/t5-v1_1-xxl ships."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "spiece"), vocab_size=60,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", hard_vocab_limit=False, minloglevel=2,
    )
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_t5_config(d_model: int = 32):
    from transformers import T5Config

    return T5Config(
        d_model=d_model, d_ff=2 * d_model, num_layers=2, num_decoder_layers=1, num_heads=4, d_kv=d_model // 4,
        vocab_size=160, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    )


def make_tiny_t5(folder: Path, d_model: int = 32, seed: int = 0) -> Path:
    """A random T5 encoder (width `d_model`) + tokenizer in the DeepFloyd folder layout."""
    from transformers import T5EncoderModel

    folder = Path(folder)
    write_t5_tokenizer(folder)
    torch.manual_seed(seed)
    T5EncoderModel(tiny_t5_config(d_model)).save_pretrained(folder)
    return folder


def make_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A random 2-level AutoencoderKL (downsampling factor 2, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(folder)
    return Path(folder)


def tiny_stdit_kwargs(**overrides) -> dict:
    cfg = dict(depth=1, hidden_size=32, num_heads=4, patch_size=(1, 2, 2), mlp_ratio=2.0)
    cfg.update(overrides)
    return cfg
