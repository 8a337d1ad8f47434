"""Low-memory sampling on the CPU: offload hooks (accelerate's, which run on the CPU too) give the same video as
no offload; tiled VAE decoding (diffusers' tiles, blended over their overlap) matches untiled decoding within a
stated tolerance on a tiny random AutoencoderKL."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_t5, make_tiny_vae, tiny_stdit_kwargs

from opendit.encoders import load_text_encoder
from opendit.encoders.vae import VideoAutoencoderKL
from opendit.low_memory import _Offloaded, enable_offload, set_vae_tiling
from opendit.models import STDiT
from opendit.pipeline import STDiTPipeline, SamplingSettings


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("low_memory")
    return dict(t5=make_tiny_t5(root / "t5", d_model=16), vae=make_tiny_vae(root / "vae"))


def make_pipe(parts: dict) -> STDiTPipeline:
    torch.manual_seed(0)
    model = STDiT(input_size=(2, 8, 8), in_channels=4, caption_channels=16, model_max_length=8,
                  **tiny_stdit_kwargs())
    for p in model.final_layer.parameters():  # DiT's zero init would make every output the same
        torch.nn.init.normal_(p, std=0.02)
    settings = SamplingSettings(num_frames=2, image_size=(16, 16), num_sampling_steps=3, text_max_length=8)
    return STDiTPipeline(model, load_text_encoder(str(parts["t5"]), 8), VideoAutoencoderKL(parts["vae"]),
                         settings=settings)


@pytest.mark.parametrize("mode", ["text", "model"])
def test_offload_gives_the_same_video(parts, mode):
    reference = make_pipe(parts)(["a red ball"], generator=torch.Generator().manual_seed(1), progress=False)
    pipe = make_pipe(parts)
    pipe.enable_offload(mode)
    assert isinstance(pipe.text_encoder, _Offloaded) and hasattr(pipe.text_encoder.model, "_hf_hook")
    assert isinstance(pipe.vae, _Offloaded) == (mode == "model")
    assert hasattr(pipe.model, "_hf_hook") == (mode == "model")
    video = pipe(["a red ball"], generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(video, reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--offload must be one of"):
        enable_offload(pipe, "gpu")


def test_tiled_decode_matches_untiled(tmp_path):
    """64x64 frames in 32-pixel tiles (16 latent pixels, a quarter overlap, blended linearly) against whole frames,
    on a tiny random AutoencoderKL without mid-block attention (a global op no tiling can reproduce). Stated
    tolerance: mean |difference| < 0.08 (outputs in [-1, 1], std ~0.35) and correlation > 0.95 -- not exact,
    because each tile's GroupNorm sees its own statistics (true of diffusers' tiling on any VAE)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=16, mid_block_add_attention=False).save_pretrained(tmp_path)
    vae = VideoAutoencoderKL(tmp_path, micro_batch_size=2)
    z = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    set_vae_tiling(vae, False)
    whole = vae.decode(z)
    set_vae_tiling(vae, True, tile_size=32)
    tiled = vae.decode(z)
    assert tiled.shape == whole.shape == (1, 3, 3, 64, 64)
    assert not torch.equal(tiled, whole)  # the tiles did run
    assert (tiled - whole).abs().mean() < 0.08, (tiled - whole).abs().mean()
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.95
    assert vae.decode_bytes(16, 512, 512) == 16 * vae.decode_bytes(1, 512, 512) > 0


def test_sample_cli_offload_and_tiling_flags(tmp_path):
    from opendit.sample import main as sample_main

    assert sample_main(["--prompt", "a red circle", "--offload", "model", "--vae_tiling", "--save_dir",
                        str(tmp_path), "--scheduler_num_sampling_steps", "2"]) == 0  # the demo model, pixel VAE
    assert (tmp_path / "sample_0.mp4").is_file()
