"""`opendit sample`: the flags of Open-Sora's sample script -> `SamplingSettings` -> `STDiTPipeline` -> video files.

Memory: the text encoder runs first over all prompts and is freed before the DiT is loaded, so peak memory is
max(T5, DiT + VAE) rather than their sum (T5-XXL alone is 4.7B parameters).

    opendit sample --prompt "a red circle moving to the right"          # bundled demo model, offline
    opendit sample --model_pretrained_path outputs/000-STDiT-Tiny-2/epoch4-global_step40 --prompt "..."
    opendit sample --model_pretrained_path OpenSora-v1-HQ-16x512x512.pth \\
        --text_pretrained_path ./t5-v1_1-xxl --vae_pretrained_path ./sd-vae-ft-ema \\
        --image_size 512 512 --num_frames 16 --model_space_scale 1.0 --prompt "a beach at sunset"

The pipeline itself lives in `opendit.pipeline` (re-exported here: ``from opendit.sample import STDiTPipeline``).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opendit.config import parse_config
from opendit.data.csvfile import read_text_file
from opendit.diffusion import PREDICTION_TYPES, SCHEDULERS
from opendit.pipeline import (
    BUNDLED_MODEL,
    STDiTPipeline,
    SamplingSettings,
    default_device,
    load_model_folder,
    load_text_encoder_for,
    parse_dtype,
    read_pipeline_json,
)
from opendit.low_memory import set_vae_tiling
from opendit.sampling_settings import FLAG_NAMES, resolve_settings

# The pipeline's names stay importable from here, where users and scripts have imported them.
__all__ = ["BUNDLED_MODEL", "STDiTPipeline", "SampleConfig", "SamplingSettings", "default_device", "load_model_folder",
           "main", "parse_dtype", "read_pipeline_json", "sample_main", "settings_from_config"]

logger = logging.getLogger("opendit")


@dataclass
class ModelFlags:
    """The flags that choose a model and its sampling defaults, shared by `opendit sample` and `opendit app`
    (one source of each: `model_settings` turns them into SamplingSettings keywords; None means "not given")."""
    model: str | None = field(default=None, metadata={
        "help": "size preset used for released .pth weights (default STDiT-XL/2)"})
    model_pretrained_path: str | None = field(default=None, metadata={
        "help": "a model folder (config.json, pipeline.json), a checkpoint of an opendit training run (its "
                "epochE-global_stepS folder or ema.pt: settings from the run's config.yaml), or released weights "
                "(.pth/.pt/.safetensors); default: the bundled demo model"})
    text_pretrained_path: str | None = field(default=None, metadata={
        "help": "text encoder folder (T5 'DeepFloyd/t5-v1_1-xxl' layout) or 'minilm'; default: the model's"})
    vae_pretrained_path: str | None = field(default=None, metadata={
        "help": "AutoencoderKL folder (e.g. sd-vae-ft-ema, or a pipeline folder with vae/) or 'pixel'; "
                "default: the model's"})
    text_max_length: int | None = field(default=None, metadata={"help": "text tokens (default: the model's, else 120)"})
    model_time_scale: float | None = field(default=None, metadata={"help": "temporal pos-embed scale"})
    model_space_scale: float | None = field(default=None, metadata={
        "help": "spatial pos-embed scale (0.5 for 256px checkpoints)"})
    image_size: tuple[int, int] | None = field(default=None, metadata={
        "help": "H W of the video (default: the model's, else 512 512)"})
    num_frames: int | None = field(default=None, metadata={
        "help": "frames per video (default: the model's, else 16)"})
    fps: int | None = field(default=None, metadata={
        "help": "frames per second of the written video (default: the model's, else 8)"})
    dtype: str | None = field(default=None, metadata={"help": "fp16 | bf16 | fp32 (default fp16 on GPU, fp32 on CPU)"})
    scheduler_num_sampling_steps: int | None = field(default=None, metadata={
        "help": "denoising steps (default: the model folder's, else 100)"})
    scheduler_cfg_scale: float | None = field(default=None, metadata={
        "help": "classifier-free guidance scale (default: the model folder's, else 7.0)"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda if available)"})

    def model_settings(self) -> dict:
        """These flags as `SamplingSettings` keywords (None: not given; the model's or the defaults table's)."""
        return dict(model_preset=self.model, text_encoder=self.text_pretrained_path, vae=self.vae_pretrained_path,
                    text_max_length=self.text_max_length, image_size=self.image_size, num_frames=self.num_frames,
                    fps=self.fps, num_sampling_steps=self.scheduler_num_sampling_steps,
                    cfg_scale=self.scheduler_cfg_scale, space_scale=self.model_space_scale,
                    time_scale=self.model_time_scale, device=self.device, dtype=self.dtype)


@dataclass
class SampleConfig(ModelFlags):
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
    enable_flashattn: bool | None = field(default=None, metadata={"help": "prefer SDPA flash/cuDNN attention"})
    enable_layernorm_kernel: bool | None = field(default=None, metadata={"help": "fused LayerNorm kernel"})
    enable_modulate_kernel: bool | None = field(default=None, metadata={"help": "fused LayerNorm+modulate kernel"})
    text_speedup: bool = field(default=False, metadata={"help": "T5 with fused RMSNorm + SDPA attention"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the transformer blocks"})
    # small GPUs (issue 23; opendit/models/lora.py, opendit/low_memory.py, docs/low_memory.md)
    lora: list[str] | None = field(default=None, metadata={
        "help": "LoRA folder(s) (peft: adapter_config.json + safetensors, e.g. a LoRA run's <checkpoint>/lora) "
                "added to the model; repeatable"})
    lora_scale: list[float] | None = field(default=None, metadata={
        "help": "strength of each --lora, in order (default 1.0 each)"})
    offload: str = field(default="none", metadata={
        "help": "keep modules on the CPU between uses: text (the text encoder is always freed before the model "
                "loads here), model (the STDiT and the VAE too, each moved to the GPU only while it runs)",
        "choices": ["none", "text", "model"]})
    vae_tiling: bool | None = field(default=None, metadata={
        "help": "decode each frame in overlapping 256-pixel tiles (less memory); default: automatically on CUDA "
                "when the estimated decode memory would not fit"})
    sequence_parallel_size: int = field(default=1, metadata={"help": "GPUs sharing one video's sequence (torchrun)"})
    sequence_parallel_type: str = field(default="dsp", metadata={"help": "dsp | ulysses",
                                                                 "choices": ["dsp", "ulysses"]})
    # fast sampling: solvers (opendit/diffusion/solvers.py) and CFG parallelism (opendit/parallel/cfg.py)
    scheduler: str | None = field(default=None, metadata={
        "help": "the sampler: iddpm (Open-Sora's ancestral sampler), ddim or dpm-solver (DPM-Solver++ 2M, good at "
                "10-20 steps); default: the model folder's pipeline.json, else iddpm", "choices": list(SCHEDULERS)})
    ddim_eta: float | None = field(default=None, metadata={
        "help": "DDIM's noise in [0, 1]: 0 deterministic (default), 1 as ancestral sampling; --scheduler ddim only"})
    cfg_parallel: bool = field(default=False, metadata={
        "help": "torchrun with 2 x --sequence_parallel_size processes: the conditional and unconditional halves "
                "of classifier-free guidance on two rank groups, one exchange per step"})
    # fast sampling: step caches (opendit/diffusion/caches.py); default: the model folder's pipeline.json, else off
    pab: bool | None = field(default=None, metadata={
        "help": "Pyramid Attention Broadcast: inside --pab_window, attention outputs are reused between steps"})
    pab_spatial_range: int | None = field(default=None, metadata={
        "help": "PAB: spatial attention computes every N-th step (default 2)"})
    pab_temporal_range: int | None = field(default=None, metadata={
        "help": "PAB: temporal attention computes every N-th step (default 4)"})
    pab_cross_range: int | None = field(default=None, metadata={
        "help": "PAB: cross-attention computes every N-th step (default 6)"})
    pab_window: tuple[int, int] | None = field(default=None, metadata={
        "help": "PAB: the timesteps LOW HIGH (exclusive, 0..1000) where attention is broadcast (default 450 930)"})
    step_cache: str | None = field(default=None, metadata={
        "help": "skip every block of a step (teacache) or all but the first (fbcache) while the input barely "
                "changed; teacache needs the model's coefficients (opendit calibrate)",
        "choices": ["none", "teacache", "fbcache"]})
    step_cache_threshold: float | None = field(default=None, metadata={
        "help": "--step_cache's threshold: higher skips more (default 0.1 teacache, 0.05 fbcache)"})


def read_prompts(cfg: SampleConfig) -> list[str]:
    prompts = list(cfg.prompt or [])
    if cfg.prompt_path:
        if not os.path.isfile(cfg.prompt_path):
            raise FileNotFoundError(f"prompt file not found: {cfg.prompt_path} (--prompt_path)")
        # a byte that is not UTF-8 is one line naming the file, line and byte (csvfile's rule for user text)
        prompts += [line.strip() for line in read_text_file(cfg.prompt_path).splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT (repeatable) or --prompt_path FILE")
    return prompts


def lora_scales(cfg: SampleConfig) -> list[tuple[str, float]]:
    """(--lora folder, --lora_scale) pairs; one scale per folder, or none (1.0 each)."""
    paths, scales = cfg.lora or [], cfg.lora_scale
    if scales is not None and len(scales) != len(paths):
        raise ValueError(f"--lora_scale: {len(scales)} scale(s) for {len(paths)} --lora folder(s); give one each")
    return list(zip(paths, scales if scales is not None else [1.0] * len(paths)))


def settings_from_config(cfg: SampleConfig, device: torch.device | None = None) -> SamplingSettings:
    """The flags over what the model records (pipeline.json / the run's config.yaml) over the defaults table;
    checked, errors naming the flags. ``device``: the one torchrun gave this process (overrides --device)."""
    flags = {**cfg.model_settings(), "device": device if device is not None else cfg.device}
    return resolve_settings(
        cfg.model_pretrained_path, names=FLAG_NAMES, **flags, scheduler=cfg.scheduler, ddim_eta=cfg.ddim_eta,
        pab=cfg.pab, pab_spatial_range=cfg.pab_spatial_range, pab_temporal_range=cfg.pab_temporal_range,
        pab_cross_range=cfg.pab_cross_range, pab_window=cfg.pab_window, step_cache=cfg.step_cache,
        step_cache_threshold=cfg.step_cache_threshold, cfg_channels=cfg.cfg_channels,
        prediction_type=cfg.prediction_type, batch_size=cfg.batch_size)


def encode_prompts(settings: SamplingSettings, batches: list[list[str]], speedup: bool) -> tuple[list[dict], int]:
    """Each batch's text states (on the CPU) and the encoder's width; the encoder is freed before returning, so
    the DiT never shares memory with T5-XXL."""
    text_encoder = load_text_encoder_for(settings, speedup=speedup, names=FLAG_NAMES)
    embeds = [{k: v.cpu() for k, v in text_encoder.encode(b).items()} for b in batches]
    width = text_encoder.output_dim
    del text_encoder
    gc.collect()
    if settings.torch_device().type == "cuda":
        torch.cuda.empty_cache()
    return embeds, width


def prepare_model(model: torch.nn.Module, cfg: SampleConfig) -> None:
    """torch.compile and sequence parallelism, applied to each STDiT (a model folder may pair two)."""
    for stdit in getattr(model, "experts", [model]):
        if cfg.compile:
            from opendit.parallel.checkpointing import apply_compile

            apply_compile(stdit)
        if cfg.sequence_parallel_size > 1 and not cfg.cfg_parallel:
            from opendit.parallel.sequence import setup_sequence_parallel_sampling

            setup_sequence_parallel_sampling(stdit, cfg.sequence_parallel_size, cfg.sequence_parallel_type)
    if cfg.cfg_parallel:  # the ("cfg", "sp") mesh: sequence parallelism inside each half's group
        from opendit.parallel.cfg import setup_cfg_parallel_sampling

        setup_cfg_parallel_sampling(model, cfg.sequence_parallel_size, cfg.sequence_parallel_type)


def sample_main(cfg: SampleConfig) -> list[Path]:
    from opendit.data.video import write_gif, write_video

    dist_info = None
    if cfg.sequence_parallel_size > 1 or cfg.cfg_parallel:  # under torchrun: each rank on its own GPU (LOCAL_RANK)
        from opendit.parallel import init_distributed

        dist_info = init_distributed()
        if cfg.cfg_parallel:  # before loading anything: a wrong process count is one line
            from opendit.parallel.cfg import check_cfg_parallel_world

            check_cfg_parallel_world(dist_info.world_size, cfg.sequence_parallel_size)
    prompts = read_prompts(cfg)
    lora_scales(cfg)  # a bad --lora/--lora_scale pairing fails before anything loads
    settings = settings_from_config(cfg, dist_info.device if dist_info is not None else None)
    t0 = time.time()

    batches = [prompts[i:i + settings.batch_size] for i in range(0, len(prompts), settings.batch_size)]
    embeds, width = encode_prompts(settings, batches, cfg.text_speedup)
    kernels = dict(enable_flashattn=cfg.enable_flashattn, enable_layernorm_kernel=cfg.enable_layernorm_kernel,
                   enable_modulate_kernel=cfg.enable_modulate_kernel)
    pipe = STDiTPipeline.from_settings(settings, caption_channels=width, model_options=kernels, names=FLAG_NAMES)
    for path, scale in lora_scales(cfg):  # --lora folders: each checked against the model as it loads
        pipe.load_lora(path, scale)
    set_vae_tiling(pipe.vae, cfg.vae_tiling)  # --vae_tiling (opendit/low_memory.py)
    pipe.enable_offload(cfg.offload)  # --offload
    prepare_model(pipe.model, cfg)

    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    written = []
    save_dir = Path(cfg.save_dir)
    for b, (batch, emb) in enumerate(zip(batches, embeds)):
        generator = torch.Generator(pipe.device).manual_seed(cfg.seed + b)
        videos = pipe(prompt_embeds=emb, generator=generator, progress=is_main)
        for j, (prompt, video) in enumerate(zip(batch, videos)):
            i = b * settings.batch_size + j
            if not is_main:
                continue
            path = write_video(save_dir / f"sample_{i}.mp4", video.cpu(), fps=settings.fps)
            if cfg.gif and settings.num_frames > 1:
                write_gif(save_dir / f"sample_{i}.gif", video.cpu(), fps=settings.fps)
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
    except USER_ERRORS as e:  # bad input: exit 2, as argparse (and `opendit prepare`) do for bad flags
        print(f"opendit sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
