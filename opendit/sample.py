"""Text-to-video sampling: the `STDiTPipeline` object and `opendit sample` (flags of Open-Sora's sample script).

Memory: the text encoder runs first over all prompts and is freed before the DiT runs, so peak memory is
max(T5, DiT + VAE) rather than their sum (T5-XXL alone is 4.7B parameters).

    opendit sample --prompt "a red circle moving to the right"          # bundled demo model, offline
    opendit sample --model_pretrained_path OpenSora-v1-HQ-16x512x512.pth \
        --text_pretrained_path ./t5-v1_1-xxl --vae_pretrained_path ./sd-vae-ft-ema \
        --image_size 512 512 --num_frames 16 --model_space_scale 1.0 --prompt "a beach at sunset"
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from opendit.config import parse_config
from opendit.diffusion import IDDPM, PREDICTION_TYPES
from opendit.models import STDiT, STDiTConfig, build_model, load_checkpoint

logger = logging.getLogger("opendit")

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "demo"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(name: str | None, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """fp16 | bf16 | fp32; None -> fp16 on CUDA (the original's default), fp32 on CPU (fp16 is slow there)."""
    from opendit.encoders import as_dtype

    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return as_dtype(name)
    except ValueError as e:
        raise ValueError(f"{e} ({flag})") from None


#################################################################################
#                                    Pipeline                                   #
#################################################################################


class STDiTPipeline:
    """Prompts in, videos out: encode prompt -> prepare latents -> denoise with CFG -> decode.

    Components: an STDiT, a text encoder (`encode(prompts) -> {"y", "mask"}`; may be None when prompt
    embeddings are passed in), a VAE (`decode`, `get_latent_size`), and an IDDPM scheduler.
    """

    def __init__(self, model: STDiT, text_encoder, vae, scheduler: IDDPM | None = None):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler or IDDPM(num_sampling_steps=100, cfg_scale=7.0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, folder: str | Path = BUNDLED_MODEL, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> "STDiTPipeline":
        """A folder with the model's config.json + model.safetensors and a pipeline.json naming its text
        encoder, VAE and sampling defaults (the layout of the bundled demo model)."""
        from opendit.encoders import load_text_encoder, load_vae

        folder = Path(folder)
        settings = read_pipeline_json(folder)
        device = torch.device(device) if device is not None else default_device()
        model = load_model_folder(folder).to(device, dtype)
        text = load_text_encoder(settings.get("text_encoder"), settings.get("text_max_length"), device=device)
        vae = load_vae(settings.get("vae", "pixel"), device=device)
        scheduler = IDDPM(num_sampling_steps=settings.get("num_sampling_steps", 50),
                          cfg_scale=settings.get("cfg_scale", 7.0),
                          prediction_type=settings.get("prediction_type", "epsilon"),
                          learn_sigma=predicts_variance(model))
        pipe = cls(model, text, vae, scheduler)
        pipe.defaults = settings
        return pipe

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        return self.text_encoder.encode(prompts)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | None = None,
        num_frames: int = 16,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: dict[str, torch.Tensor] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Returns videos (B, C, T, H, W) in [-1, 1]."""
        # 1. check inputs
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompts or prompt_embeds")
        scheduler = self.scheduler
        if num_inference_steps is not None or guidance_scale is not None:
            scheduler = IDDPM(
                num_sampling_steps=num_inference_steps or scheduler.num_timesteps,
                cfg_scale=scheduler.cfg_scale if guidance_scale is None else guidance_scale,
                cfg_channels=scheduler.cfg_channels,
                prediction_type=scheduler.prediction_type,
                learn_sigma=scheduler.learn_sigma,
            )
        latent_size = self.vae.get_latent_size((num_frames, height, width))
        check_latent_size(latent_size, self.model.patch_size, (num_frames, height, width))
        device = self.device

        # 2. encode prompt; the null caption is the model's learned one
        embeds = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts)
        y, mask = embeds["y"].to(device), embeds["mask"].to(device)
        n = y.shape[0]
        y_null = self.model.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1).to(y.dtype)
        model_kwargs = {"y": torch.cat([y, y_null]), "mask": mask}  # mask repeated for the null half, as trained

        # 3. prepare latents
        z = torch.randn(n, self.vae.out_channels, *latent_size, generator=generator, device=device,
                        dtype=torch.float32)

        # 4. denoise
        # Pixel-space models denoise images, which lie in [-1, 1]: clipping the x_0 estimate keeps sampling
        # stable (as DDPM does for images); latents of a VAE are unbounded and are never clipped.
        clip = getattr(self.vae, "bounded", False)
        samples = scheduler.sample(self.model, z, model_kwargs, progress=progress, generator=generator,
                                   clip_denoised=clip)

        # 5. decode
        video = self.vae.decode(samples.to(getattr(self.vae, "dtype", samples.dtype)))
        return video.float().clamp(-1, 1)


def check_latent_size(latent_size: tuple[int, int, int], patch: tuple[int, int, int], video_size: tuple) -> None:
    for axis, (n, p) in enumerate(zip(latent_size, patch)):
        if n % p:
            name = ("--num_frames", "--image_size H", "--image_size W")[axis]
            raise ValueError(
                f"{name}: size {video_size[axis]} gives latent {n}, not divisible by the patch size {p} "
                f"(image sizes must be multiples of the VAE factor x patch)"
            )


def read_pipeline_json(folder: Path) -> dict:
    path = Path(folder) / "pipeline.json"
    if not path.is_file():
        raise FileNotFoundError(f"no pipeline.json in model folder {folder}")
    return json.loads(path.read_text())


def load_model_folder(folder: str | Path, **overrides) -> torch.nn.Module:
    """The STDiT of a model folder (config.json + model.safetensors; ``overrides`` replace config keys), paired
    with its high-noise expert when pipeline.json names one::

        "high_noise_model": {"folder": "high_noise", "from_timestep": 600}

    (a sub-folder of the same layout, whose own pipeline.json gives its prediction type). The pair's output is
    of the main model's prediction type (pipeline.json's ``prediction_type``), so the scheduler needs no change.
    """
    from opendit.diffusion.experts import NoiseLevelExperts

    folder = Path(folder)
    model = STDiT.from_pretrained(str(folder), **overrides)
    settings = read_pipeline_json(folder) if (folder / "pipeline.json").is_file() else {}
    expert = settings.get("high_noise_model")
    if expert is None:
        return model
    try:
        sub, from_timestep = folder / expert["folder"], int(expert["from_timestep"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'pipeline.json'}: high_noise_model must be "
                         f'{{"folder": ..., "from_timestep": ...}}, got {expert!r}') from e
    high = STDiT.from_pretrained(str(sub), **overrides)
    high_type = read_pipeline_json(sub).get("prediction_type", "epsilon")
    logger.info(f"high-noise expert {sub} ({high_type}) for timesteps >= {from_timestep}")
    return NoiseLevelExperts(model, high, from_timestep, settings.get("prediction_type", "epsilon"), high_type)


#################################################################################
#                                  CLI: opendit sample                          #
#################################################################################


@dataclass
class SampleConfig:
    model: str = field(default="STDiT-XL/2", metadata={"help": "size preset used for a released .pth checkpoint"})
    model_pretrained_path: str | None = field(default=None, metadata={
        "help": "STDiT checkpoint (.pth/.pt/.safetensors, an ema.pt, or a folder with config.json); "
                "default: the bundled demo model"})
    text_pretrained_path: str | None = field(default=None, metadata={
        "help": "text encoder folder (T5 'DeepFloyd/t5-v1_1-xxl' layout) or 'minilm'"})
    vae_pretrained_path: str | None = field(default=None, metadata={
        "help": "AutoencoderKL folder (e.g. sd-vae-ft-ema, or a pipeline folder with vae/) or 'pixel'"})
    text_max_length: int | None = field(default=None, metadata={"help": "text tokens (120 for T5)"})
    model_time_scale: float | None = field(default=None, metadata={"help": "temporal pos-embed scale"})
    model_space_scale: float | None = field(default=None, metadata={"help": "spatial pos-embed scale (0.5 for 256px checkpoints)"})
    image_size: tuple[int, int] | None = field(default=None, metadata={"help": "H W of the video"})
    num_frames: int | None = field(default=None, metadata={"help": "frames per video"})
    fps: int | None = field(default=None, metadata={"help": "frames per second of the written video"})
    dtype: str | None = field(default=None, metadata={"help": "fp16 | bf16 | fp32 (default fp16 on GPU, fp32 on CPU)"})
    scheduler_num_sampling_steps: int | None = field(default=None, metadata={"help": "denoising steps (default 100)"})
    scheduler_cfg_scale: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (default 7.0)"})
    cfg_channels: int | None = field(default=None, metadata={
        "help": "guide only the first N eps channels (3 reproduces the original exactly); default all"})
    prediction_type: str | None = field(default=None, metadata={
        "help": "what the model predicts: epsilon, sample (x_0) or v_prediction; default: the model folder's "
                "pipeline.json, the training run's config.yaml for a checkpoint of one of our runs, else epsilon",
        "choices": list(PREDICTION_TYPES)})
    batch_size: int = field(default=1, metadata={"help": "prompts sampled together"})
    seed: int = field(default=42, metadata={"help": "random seed (videos are reproducible per seed)"})
    save_dir: str = field(default="./samples", metadata={"help": "output folder"})
    prompt: list[str] | None = field(default=None, metadata={"help": "prompt(s) to sample"})
    prompt_path: str | None = field(default=None, metadata={"help": "text file, one prompt per line"})
    gif: bool = field(default=True, metadata={"help": "also write a .gif preview next to each .mp4"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda if available)"})
    enable_flashattn: bool | None = field(default=None, metadata={"help": "prefer SDPA flash/cuDNN attention"})
    enable_layernorm_kernel: bool | None = field(default=None, metadata={"help": "fused LayerNorm kernel"})
    enable_modulate_kernel: bool | None = field(default=None, metadata={"help": "fused LayerNorm+modulate kernel"})
    text_speedup: bool = field(default=False, metadata={"help": "T5 with fused RMSNorm + SDPA attention"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the transformer blocks"})
    sequence_parallel_size: int = field(default=1, metadata={"help": "GPUs sharing one video's sequence (torchrun)"})
    sequence_parallel_type: str = field(default="dsp", metadata={"help": "dsp | ulysses", "choices": ["dsp", "ulysses"]})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")


def read_prompts(cfg: SampleConfig) -> list[str]:
    prompts = list(cfg.prompt or [])
    if cfg.prompt_path:
        if not os.path.isfile(cfg.prompt_path):
            raise FileNotFoundError(f"prompt file not found: {cfg.prompt_path} (--prompt_path)")
        with open(cfg.prompt_path, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT (repeatable) or --prompt_path FILE")
    return prompts


def resolve_settings(cfg: SampleConfig) -> dict:
    """Merge flags with the model folder's pipeline.json (bundled model) or the released-checkpoint defaults."""
    path = cfg.model_pretrained_path
    folder = Path(path) if path is not None else BUNDLED_MODEL
    if path is None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no --model_pretrained_path given and the bundled model is missing at {folder}")
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"model checkpoint not found: {path} (--model_pretrained_path)")
    defaults = dict(image_size=(512, 512), num_frames=16, fps=8, num_sampling_steps=100, cfg_scale=7.0,
                    text_max_length=120, text_encoder=None, vae=None, prediction_type="epsilon")
    if folder.is_dir() and (folder / "pipeline.json").is_file():
        defaults.update(read_pipeline_json(folder))
    elif path is not None and (run_config := find_run_model_config(path)) is not None:
        train_config = run_config.parent / "config.yaml"  # the checkpoint's run: how it was trained
        if train_config.is_file():
            defaults["prediction_type"] = yaml.safe_load(train_config.read_text()).get("prediction_type", "epsilon")
    chosen = lambda flag, key: flag if flag is not None else defaults[key]  # noqa: E731
    s = dict(
        model_folder=str(folder) if folder.is_dir() and (folder / "config.json").is_file() else None,
        checkpoint=path,
        text_encoder=chosen(cfg.text_pretrained_path, "text_encoder"),
        vae=chosen(cfg.vae_pretrained_path, "vae"),
        text_max_length=chosen(cfg.text_max_length, "text_max_length"),
        image_size=tuple(chosen(cfg.image_size, "image_size")),
        num_frames=chosen(cfg.num_frames, "num_frames"),
        fps=chosen(cfg.fps, "fps"),
        num_sampling_steps=chosen(cfg.scheduler_num_sampling_steps, "num_sampling_steps"),
        cfg_scale=chosen(cfg.scheduler_cfg_scale, "cfg_scale"),
        prediction_type=chosen(cfg.prediction_type, "prediction_type"),
        # None: a model folder / run config keeps its own scales; a bare checkpoint gets 1.0
        space_scale=cfg.model_space_scale,
        time_scale=cfg.model_time_scale,
    )
    if s["text_encoder"] is None:
        raise ValueError("--text_pretrained_path is required with a released checkpoint (a T5 folder, or 'minilm')")
    if s["vae"] is None:
        raise ValueError("--vae_pretrained_path is required with a released checkpoint (an AutoencoderKL folder, or 'pixel')")
    return s


def predicts_variance(model: torch.nn.Module) -> bool:
    """Whether the model outputs the variance channels too (STDiT's ``pred_sigma``, Open-Sora's default)."""
    return model.out_channels == 2 * model.in_channels


def build_sampling_model(s: dict, caption_channels: int, latent_size: tuple, in_channels: int, cfg: SampleConfig,
                         device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    overrides = dict(enable_flashattn=cfg.enable_flashattn, enable_layernorm_kernel=cfg.enable_layernorm_kernel,
                     enable_modulate_kernel=cfg.enable_modulate_kernel)
    overrides.update({k: s[k] for k in ("space_scale", "time_scale") if s[k] is not None})
    if s["model_folder"] is not None:  # config.json + safetensors: the folder knows its own shape
        model = load_model_folder(s["model_folder"], **overrides)
    elif (run_config := find_run_model_config(s["checkpoint"])) is not None:  # an ema.pt of one of our runs
        logger.info(f"model configuration from {run_config}")
        model = STDiT(STDiTConfig.from_dict({**json.loads(run_config.read_text()), **overrides}))
        load_checkpoint(model, s["checkpoint"])
    else:  # a released checkpoint: the preset plus what the encoders and sizes imply
        model = build_model(cfg.model, **{"space_scale": 1.0, "time_scale": 1.0, **overrides}, input_size=latent_size,
                            in_channels=in_channels, caption_channels=caption_channels,
                            model_max_length=s["text_max_length"])
        load_checkpoint(model, s["checkpoint"])
    return model.to(device, dtype).eval()


def find_run_model_config(checkpoint: str) -> Path | None:
    """`model_config.json` of the training run a checkpoint comes from (run/epochE-global_stepS/ema.pt), if any."""
    path = Path(checkpoint).resolve()
    for folder in (path.parent, path.parent.parent):
        if (folder / "model_config.json").is_file():
            return folder / "model_config.json"
    return None


def sample_main(cfg: SampleConfig) -> list[Path]:
    from opendit.data.video import write_gif, write_video
    from opendit.encoders import load_text_encoder, load_vae

    dist_info = None
    if cfg.sequence_parallel_size > 1:  # under torchrun: each rank on its own GPU (LOCAL_RANK)
        from opendit.parallel import init_distributed

        dist_info = init_distributed()
        device = dist_info.device
    else:
        device = torch.device(cfg.device) if cfg.device else default_device()
    dtype = parse_dtype(cfg.dtype, device)
    prompts = read_prompts(cfg)
    s = resolve_settings(cfg)
    H, W = s["image_size"]
    t0 = time.time()

    # Text first, then free it: the DiT never shares memory with T5-XXL.
    text_encoder = load_text_encoder(s["text_encoder"], s["text_max_length"], dtype=dtype, device=device,
                                     speedup=cfg.text_speedup)
    batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    embeds = [{k: v.cpu() for k, v in text_encoder.encode(b).items()} for b in batches]
    caption_channels = text_encoder.output_dim
    del text_encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    vae = load_vae(s["vae"], dtype=dtype, device=device)
    latent_size = vae.get_latent_size((s["num_frames"], H, W))
    model = build_sampling_model(s, caption_channels, latent_size, vae.out_channels, cfg, device, dtype)
    for stdit in getattr(model, "experts", [model]):  # a model folder may pair two STDiTs (NoiseLevelExperts)
        if cfg.compile:
            from opendit.parallel.checkpointing import apply_compile

            apply_compile(stdit)
        if cfg.sequence_parallel_size > 1:
            from opendit.parallel.sequence import setup_sequence_parallel_sampling

            setup_sequence_parallel_sampling(stdit, cfg.sequence_parallel_size, cfg.sequence_parallel_type)
    pipe = STDiTPipeline(model, None, vae, IDDPM(num_sampling_steps=s["num_sampling_steps"],
                                                   cfg_scale=s["cfg_scale"], cfg_channels=cfg.cfg_channels,
                                                   prediction_type=s["prediction_type"],
                                                   learn_sigma=predicts_variance(model)))
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    written = []
    save_dir = Path(cfg.save_dir)
    for b, (batch, emb) in enumerate(zip(batches, embeds)):
        generator = torch.Generator(device).manual_seed(cfg.seed + b)
        videos = pipe(prompt_embeds=emb, num_frames=s["num_frames"], height=H, width=W, generator=generator,
                      progress=is_main)
        for j, (prompt, video) in enumerate(zip(batch, videos)):
            i = b * cfg.batch_size + j
            if not is_main:
                continue
            path = write_video(save_dir / f"sample_{i}.mp4", video.cpu(), fps=s["fps"])
            if cfg.gif and s["num_frames"] > 1:
                write_gif(save_dir / f"sample_{i}.gif", video.cpu(), fps=s["fps"])
            print(f"[{i}] {prompt!r} -> {path}", flush=True)
            written.append(path)
    if is_main:
        print(f"wrote {len(written)} sample(s) to {save_dir} in {time.time() - t0:.1f}s", flush=True)
    if dist_info is not None and dist_info.created_group:
        torch.distributed.destroy_process_group()
    return written


USER_ERRORS = (FileNotFoundError, ValueError, KeyError, OSError)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(SampleConfig, argv, prog="opendit sample", description="Sample videos from text prompts.")
    try:
        sample_main(cfg)
    except USER_ERRORS as e:
        print(f"opendit sample: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
