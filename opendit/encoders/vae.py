"""Video VAEs: an image AutoencoderKL applied frame by frame (Open-Sora v1.0's SD VAE) and an identity one.

Videos are (B, 3, T, H, W) in [-1, 1]; latents are (B, C, T, H/f, W/f), already multiplied by the VAE's
scaling factor (0.18215 for the SD VAE) so that they have roughly unit variance, as the diffusion expects.
"""

from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from opendit.encoders.text import as_dtype


def _vae_folder(path: str | Path) -> tuple[Path, str | None]:
    """(folder, subfolder) for an AutoencoderKL folder or a diffusers pipeline folder with `vae/`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder not found: {path} (--vae_pretrained_path)")
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "vae" / "config.json").is_file():
        return folder, "vae"
    raise FileNotFoundError(f"no config.json in {folder} nor in {folder / 'vae'} (--vae_pretrained_path)")


def _check_video(x: torch.Tensor, channels: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, T, H, W), got shape {tuple(x.shape)}")


class VideoAutoencoderKL(nn.Module):
    """A diffusers AutoencoderKL run on every frame of a video, `micro_batch_size` frames at a time.

    Args:
        path: an AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema) or a pipeline folder with `vae/`.
        micro_batch_size: frames per VAE call, bounding activation memory; None runs all frames at once.
        dtype: weights are loaded in this dtype; inputs are cast to it. Outputs are float32.
        device: where the VAE runs.
    """

    def __init__(
        self,
        path: str | Path,
        micro_batch_size: int | None = 4,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        from diffusers import AutoencoderKL  # here, so that the pixel VAE and latent caches need no diffusers

        folder, subfolder = _vae_folder(path)
        self.module = AutoencoderKL.from_pretrained(
            folder, subfolder=subfolder, torch_dtype=as_dtype(dtype), local_files_only=True
        )
        self.module.to(device).eval().requires_grad_(False)
        config = self.module.config
        self.micro_batch_size = micro_batch_size
        self.in_channels: int = config.in_channels
        self.out_channels: int = config.latent_channels
        factor = 2 ** (len(config.block_out_channels) - 1)  # one 2x downsample between consecutive blocks
        self.patch_size: tuple[int, int, int] = (1, factor, factor)
        self.scaling_factor: float = float(config.scaling_factor)
        self.shift_factor: float = float(getattr(config, "shift_factor", None) or 0.0)  # SD3/Flux VAEs; 0 for SD
        self.tiling: bool | None = None  # decode in spatial tiles: None decides per call (CUDA: by free memory)

    # ---- low-memory decoding (--vae_tiling, docs/low_memory.md) --------------------------------------------------
    def set_tiling(self, enabled: bool | None, tile_size: int = 256) -> None:
        """Decode each frame in ``tile_size``-pixel tiles that overlap by a quarter and are blended linearly
        (diffusers' AutoencoderKL tiling); None: only when `decode_bytes` would not fit in free GPU memory."""
        self.tiling = enabled
        f = self.patch_size[1]
        self.module.tile_sample_min_size = tile_size  # diffusers' own defaults are the VAE's sample_size (512)
        self.module.tile_latent_min_size = tile_size // f
        self.module.use_tiling = bool(enabled)

    def decode_bytes(self, frames: int, height: int, width: int) -> int:
        """Estimated peak activation memory of decoding ``frames`` frames of height x width pixels at once: the
        two full-resolution up blocks hold about three maps of their widths each (a heuristic, checked on the
        SD VAE only by its order of magnitude)."""
        widths = self.module.config.block_out_channels
        return frames * height * width * self.dtype.itemsize * 3 * (widths[0] + widths[min(1, len(widths) - 1)])

    def _decide_tiling(self, frames: int, height: int, width: int) -> None:
        """Automatic choice (``tiling`` None) on CUDA: fewer frames per call, then tiles, until it fits."""
        if self.tiling is not None or self.device.type != "cuda":
            return
        free = torch.cuda.mem_get_info(self.device)[0] * 0.8
        per_call = min(frames, self.micro_batch_size or frames)
        while per_call > 1 and self.decode_bytes(per_call, height, width) > free:
            per_call //= 2
        self.micro_batch_size = per_call
        self.module.use_tiling = self.decode_bytes(per_call, height, width) > free

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def _chunks(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return frames.split(self.micro_batch_size or frames.shape[0])

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and std of every frame, as float32 ((B T), C, h, w)."""
        _check_video(x, self.in_channels, "x")
        frames = rearrange(x, "B C T H W -> (B T) C H W")
        means, stds = [], []
        for chunk in self._chunks(frames):
            dist = self.module.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior (mean, std), each (B, C, T, h, w): `mean + std * randn` is a scaled latent sample."""
        mean, std = self._moments(x)
        mean = (mean - self.shift_factor) * self.scaling_factor
        std = std * self.scaling_factor
        B = x.shape[0]
        return (
            rearrange(mean, "(B T) C H W -> B C T H W", B=B),
            rearrange(std, "(B T) C H W -> B C T H W", B=B),
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> scaled latent sample (B, C, T, H/f, W/f), float32.

        The noise is drawn for all frames at once, so a given generator gives the same latents whatever the
        micro-batch size.
        """
        from diffusers.utils.torch_utils import randn_tensor

        mean, std = self._moments(x)
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = (mean + std * noise - self.shift_factor) * self.scaling_factor
        return rearrange(z, "(B T) C H W -> B C T H W", B=x.shape[0])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, T, h, w) -> video (B, 3, T, h*f, w*f), float32 (roughly in [-1, 1])."""
        _check_video(z, self.out_channels, "z")
        latents = rearrange(z, "B C T H W -> (B T) C H W") / self.scaling_factor + self.shift_factor
        f = self.patch_size[1]
        self._decide_tiling(latents.shape[0], latents.shape[-2] * f, latents.shape[-1] * f)  # (BT, C, h, w)
        frames = [self.module.decode(c.to(self.device, self.dtype)).sample.float() for c in self._chunks(latents)]
        return rearrange(torch.cat(frames), "(B T) C H W -> B C T H W", B=z.shape[0])

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) of a video -> (T, H/f, W/f) of its latents."""
        T, H, W = input_size
        f = self.patch_size[1]
        if H % f or W % f:
            raise ValueError(
                f"video size {H}x{W} is not divisible by the VAE downsampling factor {f}: "
                f"use a height and width that are multiples of {f}"
            )
        return (T, H // f, W // f)


class PixelVAE(nn.Module):
    """Identity "VAE" so tiny models can be trained and sampled directly in pixel space."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.in_channels = channels
        self.out_channels = channels
        self.patch_size: tuple[int, int, int] = (1, 1, 1)
        self.scaling_factor = 1.0
        self.bounded = True  # "latents" are images in [-1, 1]: samplers may clip their x_0 estimate

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns `x` itself (B, C, T, H, W); `generator` is accepted for interface parity."""
        _check_video(x, self.in_channels, "x")
        return x

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, 0): the "posterior" is a point mass."""
        _check_video(x, self.in_channels, "x")
        return x, torch.zeros_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _check_video(z, self.out_channels, "z")
        return z

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        T, H, W = input_size
        return (T, H, W)


def load_vae(
    path: str | Path,
    micro_batch_size: int | None = 4,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> VideoAutoencoderKL | PixelVAE:
    """"pixel" -> `PixelVAE`; anything else is an AutoencoderKL folder -> `VideoAutoencoderKL`."""
    if path is None:
        raise ValueError('no VAE given (--vae_pretrained_path): pass an AutoencoderKL folder or "pixel"')
    if str(path) == "pixel":
        return PixelVAE()
    return VideoAutoencoderKL(path, micro_batch_size=micro_batch_size, dtype=dtype, device=device)


def vae_patch_size(path: str | Path) -> tuple[int, int, int]:
    """(T, H, W) downsampling of the VAE at ``path`` read from its config alone (nothing loaded): what sizes the
    training data must be multiples of before the VAE itself is loaded (shape buckets check it at start-up)."""
    if str(path) == "pixel":
        return (1, 1, 1)
    import json

    folder, sub = _vae_folder(path)
    config = json.loads(((folder / sub) if sub else folder).joinpath("config.json").read_text())
    factor = 2 ** (len(config.get("block_out_channels", [0, 0, 0, 0])) - 1)  # as VideoAutoencoderKL computes it
    return (1, factor, factor)
