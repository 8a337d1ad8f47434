"""`SamplingSettings`: every setting of one sampling run, its one defaults table and its one set of checks.

The CLI (`opendit sample`), `STDiTPipeline.from_pretrained` and the pipeline's call all resolve and check their
values here, so a bad value gives the same one-line ValueError wherever it comes from; each names the setting
the way its caller does (a flag, a keyword argument).

Precedence (`resolve_settings`): the defaults below (Open-Sora v1.0's released checkpoints) < what the model
records (a model folder's pipeline.json, a run's config.yaml) < explicit values (flags, keyword arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from pathlib import Path

import torch

from opendit.diffusion import PREDICTION_TYPES, SCHEDULERS
from opendit.diffusion.caches import check_cache_settings
from opendit.model_folder import read_model_source
from opendit.models import MODEL_PRESETS

DIFFUSION_STEPS = 1000  # steps of the training process (IDDPM's diffusion_steps): the most a sampler can take

# The flag of each setting (`opendit sample`) where it is not --<field>; "height" / "width" are image_size's axes.
FLAGS = {
    "model": "--model_pretrained_path", "model_preset": "--model", "text_encoder": "--text_pretrained_path",
    "vae": "--vae_pretrained_path", "num_sampling_steps": "--scheduler_num_sampling_steps",
    "cfg_scale": "--scheduler_cfg_scale", "space_scale": "--model_space_scale", "time_scale": "--model_time_scale",
    "height": "--image_size H", "width": "--image_size W",
    "pab_window": "--pab_window LOW HIGH",
}
# The pipeline call's argument names where they are not the field's.
CALL_ARGUMENTS = {"num_sampling_steps": "num_inference_steps", "cfg_scale": "guidance_scale"}


def flag(key: str) -> str:
    return FLAGS.get(key, f"--{key}")


def python_name(key: str, call: bool = False) -> str:
    """A setting named for Python callers: the keyword (of the call, or of SamplingSettings), plus its flag when
    that differs (``num_inference_steps (--scheduler_num_sampling_steps)``)."""
    name = CALL_ARGUMENTS.get(key, key) if call else key
    return name if flag(key) == f"--{name}" else f"{name} ({flag(key)})"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None, flag: str = "--device") -> torch.device:
    """A usable torch.device (None: cuda if available, else cpu); one that this build cannot use is a ValueError."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag}: unknown device {device!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: this PyTorch sees no CUDA GPU (a CPU-only build, or no visible "
                             "device); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available in this PyTorch")
    return dev


def parse_dtype(name: str | torch.dtype | None, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """fp16 | bf16 | fp32 (or a torch.dtype); None -> fp16 on CUDA (the original's default), fp32 elsewhere."""
    from opendit.encoders import as_dtype

    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return as_dtype(name)
    except ValueError as e:
        raise ValueError(f"{e} ({flag})") from None


def _is_int(value, low: int, high: int | None = None) -> bool:
    ok = isinstance(value, Integral) and not isinstance(value, bool) and value >= low
    return ok and (high is None or value <= high)


def _is_positive_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class SamplingSettings:
    """The settings of one sampling run. The field defaults are the one defaults table: those of Open-Sora
    v1.0's released checkpoints, used for whatever neither the model nor the caller gives."""

    model: str | None = None  # model folder, run checkpoint (folder or ema.pt) or released weights; None: the demo
    model_preset: str = "STDiT-XL/2"  # architecture of a released checkpoint (folders and runs record their own)
    text_encoder: str | None = None  # T5 folder or "minilm"
    vae: str | None = None  # AutoencoderKL folder or "pixel"
    text_max_length: int = 120  # text tokens
    image_size: tuple[int, int] = (512, 512)  # H, W of the video
    num_frames: int = 16
    fps: int = 8  # frames per second of written videos
    num_sampling_steps: int = 100  # denoising steps
    scheduler: str = "iddpm"  # the sampler: iddpm | ddim | dpm-solver (opendit/diffusion/solvers.py)
    ddim_eta: float = 0.0  # DDIM's noise: 0 deterministic, 1 as ancestral DDPM (scheduler "ddim" only)
    cfg_scale: float = 7.0  # classifier-free guidance scale
    cfg_channels: int | None = None  # guide only the first N noise channels (3: the original); None: all
    prediction_type: str = "epsilon"  # epsilon | sample | v_prediction
    space_scale: float | None = None  # spatial positional scale; None: the model's own (1.0 for released weights)
    time_scale: float | None = None  # temporal positional scale; None as space_scale
    batch_size: int = 1  # prompts denoised together
    device: str | torch.device | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # fp16 | bf16 | fp32; None: fp16 on CUDA, fp32 elsewhere
    # Step caches (opendit/diffusion/caches.py); off by default, which leaves sampling exactly as it was.
    pab: bool = False  # Pyramid Attention Broadcast: reuse attention outputs across steps
    pab_spatial_range: int = 2  # inside the window, spatial attention computes every N-th step (VideoSys: 2)
    pab_temporal_range: int = 4  # temporal attention (VideoSys: 4)
    pab_cross_range: int = 6  # cross-attention (VideoSys: 6)
    pab_window: tuple[int, int] = (450, 930)  # timesteps LOW < t < HIGH where PAB broadcasts (VideoSys)
    step_cache: str = "none"  # none | teacache | fbcache: skip whole steps' blocks when the input barely changed
    step_cache_threshold: float | None = None  # None: 0.1 for teacache, 0.05 for fbcache
    teacache_coefficients: list[float] | None = None  # the model's rescale polynomial (`opendit calibrate`)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):  # JSON / YAML give lists
            self.image_size = tuple(self.image_size)
        if isinstance(self.pab_window, list):
            self.pab_window = tuple(self.pab_window)
        if isinstance(self.model, Path):
            self.model = str(self.model)

    @property
    def video_size(self) -> tuple[int, int, int]:
        """(T, H, W) of the videos."""
        return (self.num_frames, *self.image_size)

    def torch_device(self, names: dict[str, str] | None = None) -> torch.device:
        return resolve_device(self.device, (names or FIELD_NAMES)["device"])

    def torch_dtype(self, names: dict[str, str] | None = None) -> torch.dtype:
        return parse_dtype(self.dtype, self.torch_device(names), (names or FIELD_NAMES)["dtype"])

    def validate(self, names: dict[str, str] | None = None) -> "SamplingSettings":
        """Check each value on its own; a bad one raises ValueError naming it by ``names`` (FLAG_NAMES for the
        CLI; default FIELD_NAMES). Checks that need the model and VAE are `check_fit`'s. Returns self."""
        names = names or FIELD_NAMES

        def require(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{names[key]} must be {rule}, got {getattr(self, key)!r}")

        require(self.model_preset in MODEL_PRESETS, "model_preset", f"one of {sorted(MODEL_PRESETS)}")
        require(_is_int(self.text_max_length, 1), "text_max_length", "an integer >= 1")
        size = self.image_size
        require(isinstance(size, tuple) and len(size) == 2 and all(_is_int(v, 1) for v in size), "image_size",
                "two integers H W >= 1")
        require(_is_int(self.num_frames, 1), "num_frames", "an integer >= 1")
        require(_is_int(self.fps, 1), "fps", "an integer >= 1")
        require(self.scheduler in SCHEDULERS, "scheduler", f"one of {list(SCHEDULERS)}")
        # one kept step leaves the last step's variance undefined (IDDPM keeps at least 2); DDIM and DPM-Solver
        # can jump from pure noise to x_0 in one
        fewest = 2 if self.scheduler == "iddpm" else 1
        require(_is_int(self.num_sampling_steps, fewest, DIFFUSION_STEPS), "num_sampling_steps",
                f"an integer in {fewest}..{DIFFUSION_STEPS}")
        require(isinstance(self.ddim_eta, Real) and not isinstance(self.ddim_eta, bool)
                and 0 <= self.ddim_eta <= 1, "ddim_eta", "a number in [0, 1]")
        require(isinstance(self.cfg_scale, Real) and not isinstance(self.cfg_scale, bool)
                and math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "cfg_scale", "a finite number >= 0")
        require(self.cfg_channels is None or _is_int(self.cfg_channels, 1), "cfg_channels", "an integer >= 1")
        require(self.prediction_type in PREDICTION_TYPES, "prediction_type", f"one of {list(PREDICTION_TYPES)}")
        for key in ("space_scale", "time_scale"):
            require(getattr(self, key) is None or _is_positive_number(getattr(self, key)), key, "a number > 0")
        require(_is_int(self.batch_size, 1), "batch_size", "an integer >= 1")
        check_cache_settings(self, names)
        self.torch_dtype(names)  # checks the device too
        return self

    def check_components(self, names: dict[str, str] | None = None) -> None:
        """Loading a pipeline needs a text encoder and a VAE: given, or recorded by the model."""
        names = names or FIELD_NAMES
        if self.text_encoder is None:
            raise ValueError(f"{names['text_encoder']} is required: the model records no text encoder "
                             "(give a T5 folder, or 'minilm')")
        if self.vae is None:
            raise ValueError(f"{names['vae']} is required: the model records no VAE (give an AutoencoderKL folder, "
                             "or 'pixel')")

    def check_fit(self, *, tokens: tuple[int, int] | None, in_channels: int, patch: tuple[int, int, int], vae,
                  caption_channels: int | None = None, names: dict[str, str] | None = None) -> None:
        """Check the settings against the model and VAE: text length and width, latent channels, video size.

        ``tokens``: (text tokens, caption width) the model's weights take (None: the model is built to fit);
        ``in_channels``, ``patch``: the model's latent channels and patch; ``caption_channels``: the text
        encoder's width, when known.
        """
        names = names or FIELD_NAMES
        if tokens is not None:
            length, width = tokens
            if self.text_max_length != length:
                raise ValueError(f"{names['text_max_length']} {self.text_max_length}: the model's weights take "
                                 f"{length} text tokens")
            if caption_channels is not None and caption_channels != width:
                raise ValueError(f"{names['text_encoder']} {self.text_encoder!r} gives {caption_channels}-wide text "
                                 f"states; the model takes {width} (its text encoder's width)")
        if vae.out_channels != in_channels:
            raise ValueError(f"{names['vae']} {self.vae!r} gives {vae.out_channels} latent channels; the model "
                             f"takes {in_channels}")
        if self.cfg_channels is not None and self.cfg_channels > in_channels:
            raise ValueError(f"{names['cfg_channels']} must be in 1..{in_channels} (the latent channels), "
                             f"got {self.cfg_channels}")
        latent = vae.get_latent_size(self.video_size)
        for key, size, n, p in zip(("num_frames", "height", "width"), self.video_size, latent, patch):
            if n % p:
                raise ValueError(f"{names[key]}: size {size} gives latent {n}, not divisible by the patch size {p} "
                                 f"(image sizes must be multiples of the VAE factor x patch)")


KEYS = [f.name for f in fields(SamplingSettings)] + ["height", "width"]
FLAG_NAMES = {key: flag(key) for key in KEYS}  # for the CLI
FIELD_NAMES = {key: python_name(key) for key in KEYS}  # for SamplingSettings / from_pretrained keywords
CALL_NAMES = {key: python_name(key, call=True) for key in KEYS}  # for STDiTPipeline.__call__


def resolve_settings(model: str | Path | None = None, names: dict[str, str] | None = None,
                     **explicit) -> SamplingSettings:
    """The settings for ``model`` (None: the bundled demo model): the defaults table, then what the model records
    (pipeline.json / its run's config.yaml), then ``explicit`` values (None: not given); validated."""
    names = names or FIELD_NAMES
    known = {f.name for f in fields(SamplingSettings)} - {"model"}
    unknown = sorted(set(explicit) - known)
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
    source = read_model_source(model, names["model"])
    values = {k: v for k, v in source.recorded.items() if k in known}
    values.update({k: v for k, v in explicit.items() if v is not None})
    settings = SamplingSettings(model=None if model is None else str(model), **values).validate(names)
    settings.check_components(names)
    return settings
