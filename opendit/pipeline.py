"""`STDiTPipeline`: prompts in, videos out; the one sampling path (the CLI, benchmarks and Python callers).

    pipe = STDiTPipeline.from_pretrained()                       # the bundled demo model, its own settings
    pipe = STDiTPipeline.from_pretrained("outputs/000-STDiT-Tiny-2/epoch4-global_step40")   # a run's checkpoint
    video = pipe(["a red circle moving to the right"], generator=torch.Generator().manual_seed(0))

Every pipeline is assembled by `STDiTPipeline.from_settings` from a `SamplingSettings` (`from_pretrained`
resolves one; `opendit sample` builds one from its flags), or from components by the constructor.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opendit.diffusion import IDDPM, DiffusersSolver, make_solver, solver_name
from opendit.diffusion.solvers import with_guidance
from opendit.diffusion.caches import apply_caches, call_cache_config
from opendit.model_folder import BUNDLED_MODEL, load_model_folder, load_stdit, read_model_source, read_pipeline_json
from opendit.models import MODEL_PRESETS
from opendit.sampling_settings import (
    CALL_NAMES,
    FIELD_NAMES,
    SamplingSettings,
    default_device,
    parse_dtype,
    resolve_settings,
)

if TYPE_CHECKING:
    from opendit.encoders import MiniLMEncoder, T5Encoder

__all__ = [
    "BUNDLED_MODEL",
    "STDiTPipeline",
    "SamplingSettings",
    "default_device",
    "load_model_folder",
    "load_text_encoder_for",
    "make_scheduler",
    "parse_dtype",
    "read_pipeline_json",
    "resolve_settings",
]


def make_scheduler(settings: SamplingSettings, learn_sigma: bool) -> IDDPM | DiffusersSolver:
    """The sampler ``settings`` describe (IDDPM, DDIM or DPM-Solver++), for a model that does (not) output the
    learned variance."""
    return make_solver(settings.scheduler, settings.num_sampling_steps, cfg_scale=settings.cfg_scale,
                       cfg_channels=settings.cfg_channels, prediction_type=settings.prediction_type,
                       learn_sigma=learn_sigma, ddim_eta=settings.ddim_eta)


def load_text_encoder_for(settings: SamplingSettings, speedup: bool = False,
                          names: dict[str, str] | None = None) -> T5Encoder | MiniLMEncoder:
    """The text encoder ``settings`` name, on their device and dtype (``speedup``: T5's fused kernels)."""
    from opendit.encoders import load_text_encoder

    names = names or FIELD_NAMES
    settings.check_components(names)
    return load_text_encoder(settings.text_encoder, settings.text_max_length, dtype=settings.torch_dtype(names),
                             device=settings.torch_device(names), speedup=speedup)


class STDiTPipeline:
    """Prompts in, videos out: check inputs -> encode prompt -> prepare latents -> denoise with CFG -> decode.

    Components: an STDiT (or `NoiseLevelExperts`), a text encoder (``encode(prompts) -> {"y", "mask"}``; None when
    prompt embeddings are passed in), a VAE (``decode``, ``get_latent_size``, ``out_channels``), and an IDDPM
    scheduler (IDDPM, DDIM or DPM-Solver++, opendit/diffusion/solvers.py). ``settings`` give the call's defaults
    (video size, steps, guidance); a given ``scheduler`` object decides its own steps and guidance; a scheduler
    name ("iddpm", "ddim", "dpm-solver") or None makes one from ``settings``.
    """

    def __init__(self, model: torch.nn.Module, text_encoder, vae,
                 scheduler: IDDPM | DiffusersSolver | str | None = None, settings: SamplingSettings | None = None):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.vae = vae
        settings = settings or SamplingSettings()
        if scheduler is None or isinstance(scheduler, str):
            if isinstance(scheduler, str):
                settings = replace(settings, scheduler=scheduler)
                settings.validate()
            scheduler = make_scheduler(settings, model.learn_sigma)
        else:
            settings = replace(settings, num_sampling_steps=scheduler.num_timesteps, cfg_scale=scheduler.cfg_scale,
                               cfg_channels=scheduler.cfg_channels, prediction_type=scheduler.prediction_type,
                               scheduler=solver_name(scheduler), ddim_eta=getattr(scheduler, "eta", settings.ddim_eta))
        self.scheduler, self.settings = scheduler, settings

    @property
    def device(self) -> torch.device:
        # (with --offload the weights wait on the CPU: the device they run on is the one recorded)
        return getattr(self, "execution_device", None) or next(self.model.parameters()).device

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = torch.float32, **settings) -> "STDiTPipeline":
        """The pipeline of a model folder (config.json, model.safetensors, pipeline.json), a checkpoint of one of
        our training runs (its folder or ema.pt), or released weights (give ``text_encoder``, ``vae``); None:
        the bundled demo model. ``settings``: any `SamplingSettings` field, over what the model records.
        """
        resolved = resolve_settings(path, device=device, dtype=dtype, **settings)
        return cls.from_settings(resolved, text_encoder=load_text_encoder_for(resolved))

    @classmethod
    def from_settings(cls, settings: SamplingSettings, text_encoder=None, caption_channels: int | None = None,
                      model_options: dict | None = None, names: dict[str, str] | None = None) -> "STDiTPipeline":
        """Assemble the pipeline ``settings`` describe (the one way: `from_pretrained` and `opendit sample`).

        ``text_encoder``: a loaded encoder, or None for a pipeline that takes ``prompt_embeds`` (then give
        ``caption_channels``, the width of those embeddings). ``model_options``: STDiT keywords replacing the
        model's (kernel switches). Settings that do not fit the model raise ValueError naming them by ``names``.
        """
        from opendit.encoders import load_vae

        names = names or FIELD_NAMES
        settings.check_components(names)
        source = read_model_source(settings.model, names["model"])
        device, dtype = settings.torch_device(names), settings.torch_dtype(names)
        if text_encoder is not None:
            caption_channels = text_encoder.output_dim
        if caption_channels is None and source.kind == "checkpoint":
            raise ValueError("a released checkpoint is built to fit its text encoder: pass text_encoder or "
                             "caption_channels")
        vae = load_vae(settings.vae, dtype=dtype, device=device)
        if source.model_config is None:  # released weights: the preset, built to fit the encoders
            in_channels, patch = vae.out_channels, MODEL_PRESETS[settings.model_preset]["patch_size"]
        else:
            in_channels, patch = source.config_value("in_channels"), tuple(source.config_value("patch_size"))
        settings.check_fit(tokens=source.token_shape, in_channels=in_channels, patch=patch, vae=vae,
                           caption_channels=caption_channels, names=names)
        scales = {k: getattr(settings, k) for k in ("space_scale", "time_scale") if getattr(settings, k) is not None}
        overrides = {**(model_options or {}), **scales}
        model = load_stdit(source, overrides, settings.model_preset, vae.get_latent_size(settings.video_size),
                           vae.out_channels, caption_channels, settings.text_max_length)
        return cls(model.to(device, dtype), text_encoder, vae, settings=settings)

    # ------------------------------------------------------------------ LoRA (opendit/models/lora.py, peft)
    def load_lora(self, path: str | Path, scale: float = 1.0, expert: str | None = None) -> str:
        """Add a LoRA (a peft folder, e.g. a LoRA run's ``<checkpoint>/lora``) to the model, unmerged, its output
        times ``scale``; several add up. With a high-noise expert: ``expert`` "low"/"high", by default "high"
        when the adapter was trained on a ``high_noise/`` model, else "low". Returns the adapter's name."""
        from opendit.models.lora import load_lora, read_lora_folder

        target = self.model
        if hasattr(self.model, "experts"):
            if expert is None:
                base = read_lora_folder(path)[0].base_model_name_or_path or ""
                expert = "high" if Path(base).parent.name == "high_noise" else "low"
            if expert not in ("low", "high"):
                raise ValueError(f"expert must be 'low' or 'high', got {expert!r}")
            target = getattr(self.model, expert)
        name = load_lora(target, path, scale)
        target.to(next(target.parameters()).device, next(target.parameters()).dtype)  # the adapter with its layer
        return name

    def enable_offload(self, mode: str = "model") -> None:
        """Keep modules on the CPU between uses: "text" (the text encoder), "model" (each module in turn), or
        "none" (opendit/low_memory.py)."""
        from opendit.low_memory import enable_offload

        enable_offload(self, mode)

    # ------------------------------------------------------------------ sampling
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{"y": (B, 1, L, D), "mask": (B, L)}`` of the text encoder."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        return self.text_encoder.encode(prompts)

    def call_settings(self, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      scheduler: str | None = None) -> SamplingSettings:
        """The pipeline's settings with a call's arguments (None: the pipeline's), checked as flags are."""
        s = self.settings
        call = replace(s, num_frames=s.num_frames if num_frames is None else num_frames,
                       scheduler=s.scheduler if scheduler is None else scheduler,
                       image_size=(s.image_size[0] if height is None else height,
                                   s.image_size[1] if width is None else width),
                       num_sampling_steps=s.num_sampling_steps if num_inference_steps is None else num_inference_steps,
                       cfg_scale=s.cfg_scale if guidance_scale is None else guidance_scale)
        call.validate(CALL_NAMES)
        call.check_fit(tokens=None, in_channels=self.model.in_channels, patch=self.model.patch_size, vae=self.vae,
                       names=CALL_NAMES)
        return call

    def scheduler_for(self, settings: SamplingSettings) -> IDDPM | DiffusersSolver:
        """The pipeline's scheduler, or one made for a call asking for another solver, other steps or guidance
        (the pipeline's own is never changed)."""
        scheduler = self.scheduler
        if (settings.scheduler, settings.num_sampling_steps) != (solver_name(scheduler), scheduler.num_timesteps):
            return make_solver(settings.scheduler, settings.num_sampling_steps, cfg_scale=settings.cfg_scale,
                               cfg_channels=scheduler.cfg_channels, prediction_type=scheduler.prediction_type,
                               learn_sigma=scheduler.learn_sigma, ddim_eta=settings.ddim_eta)
        if settings.cfg_scale != scheduler.cfg_scale:  # guidance is read at each step only: same schedule
            return with_guidance(scheduler, settings.cfg_scale)
        return scheduler

    def condition(self, prompts: list[str] | None, prompt_embeds: dict[str, torch.Tensor] | None) -> dict:
        """Model keywords for CFG: the captions' states, then as many of the model's learned null caption."""
        embeds = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts)
        y, mask = embeds["y"].to(self.device), embeds["mask"].to(self.device)  # (n, 1, L, D), (n, L)
        null = self.model.y_embedder.y_embedding  # (L, D)
        if tuple(y.shape[-2:]) != tuple(null.shape):
            raise ValueError(f"text states of {y.shape[-2]} tokens x {y.shape[-1]} channels; the model takes "
                             f"{null.shape[0]} x {null.shape[1]} (text_max_length, text encoder width)")
        y_null = null[None, None].expand(y.shape[0], 1, -1, -1).to(y.device, y.dtype)  # (n, 1, L, D)
        return {"y": torch.cat([y, y_null]), "mask": mask}  # mask repeated for the null half, as trained

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: dict[str, torch.Tensor] | None = None,
        progress: bool = True,
        scheduler: str | None = None,
        pab: bool | None = None,
        step_cache: str | None = None,
        step_cache_threshold: float | None = None,
    ) -> torch.Tensor:
        """Videos (B, C, T, H, W) in [-1, 1]; sizes, steps, guidance and the solver (``scheduler``: "iddpm",
        "ddim", "dpm-solver") default to the pipeline's settings. A bad argument raises ValueError naming it."""
        # 1. check inputs
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompts or prompt_embeds")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        settings = self.call_settings(num_frames, height, width, num_inference_steps, guidance_scale, scheduler)
        scheduler = self.scheduler_for(settings)
        # step caches (``pab``, ``step_cache``, ``step_cache_threshold``; None: the settings'): diffusion/caches.py
        caches = call_cache_config(settings, CALL_NAMES, pab=pab, step_cache=step_cache,
                                   step_cache_threshold=step_cache_threshold)

        # 2. encode prompt
        model_kwargs = self.condition(prompts, prompt_embeds)
        n = model_kwargs["y"].shape[0] // 2

        # 3. prepare latents
        latent_size = self.vae.get_latent_size(settings.video_size)  # (T', H', W')
        z = torch.randn(n, self.vae.out_channels, *latent_size, generator=generator, device=self.device,
                        dtype=torch.float32)  # (n, C, T', H', W')

        # 4. denoise
        # Pixel-space models denoise images, which lie in [-1, 1]: clipping the x_0 estimate keeps sampling
        # stable (as DDPM does for images); latents of a VAE are unbounded and are never clipped.
        clip = getattr(self.vae, "bounded", False)
        with apply_caches(self.model, caches) as self.cache_stats:  # what the caches skipped, for benchmarks
            samples = scheduler.sample(self.model, z, model_kwargs, progress=progress, generator=generator,
                                       clip_denoised=clip)

        # 5. decode
        video = self.vae.decode(samples.to(getattr(self.vae, "dtype", samples.dtype)))  # (n, 3, T, H, W)
        return video.float().clamp(-1, 1)
