"""`opendit train`'s settings: one typed dataclass, each field a flag (the original's, plus "(new)" ones) with its
help text and checks; a YAML file (`--config`, or a run's own `config.yaml`) sets the same fields. Also the STDiT
those settings describe (`build_stdit`: the preset, `--model_config`, and the sizes the data and encoders give)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from opendit.diffusion import LOSS_WEIGHTINGS, PREDICTION_TYPES
from opendit.models import MODEL_PRESETS, STDiT, STDiTConfig


@dataclass
class TrainConfig:
    # data
    data_path: str | None = field(default=None, metadata={"help": "CSV of path,text[,...] rows (required)"})
    num_frames: int = field(default=16, metadata={"help": "frames per training clip"})
    image_size: tuple[int, int] = field(default=(512, 512), metadata={"help": "H W of the training clips"})
    frame_interval: int = field(default=3, metadata={"help": "take every N-th frame of a video"})
    num_workers: int = field(default=4, metadata={"help": "data loading processes per rank"})
    max_bad_fraction: float = field(default=0.1, metadata={
        "help": "(new) stop when more than this fraction of the samples seen cannot be decoded"})
    # model
    model: str = field(default="STDiT-XL/2", metadata={
        "help": "(new) size preset", "choices": sorted(MODEL_PRESETS)})
    model_config: str | None = field(default=None, metadata={
        "help": "(new) JSON/YAML file of STDiT keywords overriding the preset (depth, hidden_size, ...)"})
    model_pretrained_path: str | None = field(default=None, metadata={
        "help": "released checkpoint (.pth/.pt/.safetensors, or ema.pt) to start from; default: random init"})
    model_pretrained_skip: list[str] | None = field(default=None, metadata={
        "help": "(new) parameter-name fragments not to load from --model_pretrained_path (they keep their fresh "
                "initialisation, listed in the log): e.g. y_embedder cross_attn to retrain the text path, or to "
                "fine-tune with a text encoder of another width"})
    model_space_scale: float = field(default=1.0, metadata={"help": "spatial pos-embed scale (0.5 for 256px)"})
    model_time_scale: float = field(default=1.0, metadata={"help": "temporal pos-embed scale"})
    freeze: str | None = field(default=None, metadata={
        "help": "(new) train only part of the model", "choices": ["not_temporal", "text"]})
    vae_pretrained_path: str = field(default="stabilityai/sd-vae-ft-ema", metadata={
        "help": "AutoencoderKL folder (or a pipeline folder with vae/), or 'pixel' for no VAE"})
    text_pretrained_path: str = field(default="./pretrained_models/t5_ckpts", metadata={
        "help": "T5 folder (DeepFloyd/t5-v1_1-xxl layout, or holding t5-v1_1-xxl/), or 'minilm'"})
    text_max_length: int = field(default=120, metadata={"help": "text tokens"})
    # optimisation
    epochs: int = field(default=1400, metadata={"help": "passes over the data"})
    max_steps: int | None = field(default=None, metadata={"help": "(new) stop after this many optimizer steps"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "(new) save a checkpoint and stop once the loop has run this long (a job's wall-time limit)"})
    batch_size: int = field(default=2, metadata={"help": "clips per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "(new) micro-steps per optimizer step"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (constant; weight decay 0)"})
    loss_weighting: str = field(default="uniform", metadata={
        "help": "(new) weight of each noise level in the loss: uniform (the original), min_snr, truncated_snr "
                "(more weight on the high-noise steps that decide layout and motion; see docs/training.md)",
        "choices": list(LOSS_WEIGHTINGS)})
    prediction_type: str = field(default="epsilon", metadata={
        "help": "(new) what the model predicts: epsilon (the noise, as Open-Sora), sample (the clean video x_0; pair "
                "it with --loss_weighting truncated_snr) or v_prediction (the noise at low noise, -x_0 at high noise, "
                "where layout and motion are decided; see docs/training.md). Recorded by opendit export for sampling",
        "choices": list(PREDICTION_TYPES)})
    timestep_range: tuple[int, int] | None = field(default=None, metadata={
        "help": "(new) draw training timesteps from LO..HI only (default: all 0..999), e.g. 700 999 for a phase "
                "on the high-noise steps where a caption decides layout and motion (docs/training.md)"})
    loss_weight_max: float | None = field(default=None, metadata={
        "help": "(new) cap on the --loss_weighting weight of the MSE term (e.g. 100 with truncated_snr: the x_0 "
                "error weighs as much as at t ~ 700 at the noisiest steps too, where it is barely visible in "
                "the noise; see docs/training.md)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0: no clipping)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "(new) EMA decay per step"})
    mixed_precision: str = field(default="bf16", metadata={
        "help": "compute precision (weights stay fp32)", "choices": ["bf16", "fp16", "fp32"]})
    grad_checkpoint: bool = field(default=False, metadata={"help": "recompute block activations in the backward"})
    compile: bool = field(default=False, metadata={"help": "(new) torch.compile each block"})
    global_seed: int = field(default=42, metadata={"help": "seed of weights, data order and noise"})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "(new) stop after this many consecutive steps with a NaN/inf loss (each one is skipped)"})
    # parallelism and kernels
    plugin: str = field(default="zero2", metadata={
        "help": "zero2: FSDP2 sharding grads + optimizer states; ddp: replicated", "choices": ["zero2", "ddp"]})
    sequence_parallel_size: int = field(default=1, metadata={"help": "processes sharing one video's sequence"})
    sequence_parallel_type: str = field(default="dsp", metadata={
        "help": "sequence parallelism kind", "choices": ["dsp", "ulysses"]})
    enable_flashattn: bool | None = field(default=None, metadata={"help": "prefer SDPA flash/cuDNN attention"})
    enable_layernorm_kernel: bool | None = field(default=None, metadata={"help": "fused LayerNorm kernel"})
    enable_modulate_kernel: bool | None = field(default=None, metadata={"help": "(new) fused LayerNorm+modulate"})
    text_speedup: bool = field(default=False, metadata={"help": "T5 with fused RMSNorm + SDPA attention"})
    # outputs
    outputs: str = field(default="./outputs", metadata={"help": "folder of the experiment folders"})
    load: str | None = field(default=None, metadata={
        "help": "checkpoint folder to resume from, or 'latest' (newest complete one under --outputs)"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    ckpt_every: int = field(default=1000, metadata={"help": "checkpoint every N steps and at the end (0: never)"})
    # ---- shape buckets (issue 21; opendit.data.buckets, docs/training.md "Training on mixed sizes") ----------------
    bucket_config: str | None = field(default=None, metadata={"mapping": True, "help": (
        "(new) YAML/JSON file of resolution -> {num_frames: [keep probability, batch size]} (Open-Sora 1.2's form; "
        "in a --config file also inline): train every clip at its own resolution, aspect ratio and length instead "
        "of --num_frames/--image_size/--batch_size; see docs/training.md")})
    auto_batch: bool = field(default=False, metadata={"help": (
        "(new, GPU only, untested) with --bucket_config: lower each bucket's batch size to the largest that fits "
        "in GPU memory, probed before training; ignored on the CPU")})
    # ---- small GPUs: LoRA, 8-bit optimizer, selective checkpointing (issue 23; opendit.train_lora, docs/low_memory.md)
    lora_rank: int | None = field(default=None, metadata={"help": (
        "(new) train a LoRA adapter of this rank (peft) instead of the whole model: base weights frozen in the "
        "training dtype; checkpoints hold the adapter only, and <checkpoint>/lora/ is a peft folder for "
        "opendit sample --lora")})
    lora_alpha: float | None = field(default=None, metadata={"help": "(new) LoRA alpha (default: the rank)"})
    lora_targets: list[str] | None = field(default=None, metadata={"help": (
        "(new) block linears to adapt, relative to a block (default: attn.qkv attn.proj attn_temp.qkv "
        "attn_temp.proj cross_attn.q_linear cross_attn.kv_linear cross_attn.proj mlp.fc1 mlp.fc2)")})
    optimizer: str = field(default="adamw", metadata={
        "help": "(new) adamw, or adamw8bit (bitsandbytes' 8-bit AdamW states, CUDA only)",
        "choices": ["adamw", "adamw8bit"]})
    grad_checkpoint_ratio: float = field(default=1.0, metadata={"help": (
        "(new) with --grad_checkpoint: the fraction of the blocks (the first ones) that recompute their "
        "activations; less memory saved, less recompute")})

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)  # a list when built from Python
        positive = ("num_frames", "frame_interval", "epochs", "batch_size", "grad_accum", "text_max_length",
                    "log_every", "max_nonfinite_steps", "sequence_parallel_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "ckpt_every", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {self.max_steps}")
        if self.timestep_range is not None:
            self.timestep_range = tuple(int(v) for v in self.timestep_range)
            if len(self.timestep_range) != 2 or not 0 <= self.timestep_range[0] <= self.timestep_range[1] <= 999:
                raise ValueError(
                    f"--timestep_range must be LO HI with 0 <= LO <= HI <= 999, got {self.timestep_range}")
        if self.loss_weight_max is not None and not self.loss_weight_max > 0:
            raise ValueError(f"--loss_weight_max must be > 0, got {self.loss_weight_max}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max_minutes must be > 0, got {self.max_minutes}")
        if self.model_pretrained_skip and not self.model_pretrained_path:
            raise ValueError("--model_pretrained_skip needs --model_pretrained_path (the checkpoint to load the rest from)")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"--image_size must be two positive sizes H W, got {self.image_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.data_path is None:
            raise ValueError("--data_path is required: a CSV of path,text rows")
        if self.bucket_config is not None:  # a file is read here, so the run's config.yaml holds the table itself
            from opendit.data.buckets import load_bucket_config

            self.bucket_config = load_bucket_config(self.bucket_config)
        from opendit.train_lora import check_low_memory_flags  # --lora_*, --optimizer, --grad_checkpoint_ratio

        check_low_memory_flags(self)


# STDiT keywords that follow from the data, the encoders and flags; a --model_config file may only repeat them.
DERIVED_KEYS = {
    "input_size": "--num_frames/--image_size and the VAE", "in_channels": "the VAE",
    "caption_channels": "the text encoder", "model_max_length": "--text_max_length",
    "space_scale": "--model_space_scale", "time_scale": "--model_time_scale", "freeze": "--freeze",
}


def read_model_config(path: str | None) -> dict:
    """STDiT keywords from a JSON or YAML file (``--model_config``; a run's ``model_config.json`` works)."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config not found: {path} (--model_config)")
    with open(path) as f:
        if path.endswith(".json"):
            data = json.load(f)
        else:
            import yaml

            data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} (--model_config) must hold a mapping of STDiT keywords")
    return data


def build_stdit(cfg: TrainConfig, vae, text_encoder) -> STDiT:  # noqa: ANN001 -- any VAE / text encoder
    """STDiT from the preset, ``--model_config`` and the sizes the data and encoders dictate."""
    derived = {
        "input_size": tuple(vae.get_latent_size((cfg.num_frames, *cfg.image_size))),
        "in_channels": vae.out_channels,
        "caption_channels": text_encoder.output_dim,
        "model_max_length": cfg.text_max_length,
        "space_scale": cfg.model_space_scale,
        "time_scale": cfg.model_time_scale,
        "freeze": cfg.freeze,
    }
    from_file = read_model_config(cfg.model_config)
    for key, value in from_file.items():
        # A size in the file must agree with the one the data and encoders give (a run's model_config.json does).
        if key in derived and (tuple(value) if isinstance(value, list) else value) != derived[key]:
            raise ValueError(f"{cfg.model_config} (--model_config): '{key}' is {value!r} in the file but "
                             f"{derived[key]!r} from {DERIVED_KEYS[key]}; remove it from the file or change the flag")
    kernels = {"enable_flashattn": cfg.enable_flashattn, "enable_layernorm_kernel": cfg.enable_layernorm_kernel,
               "enable_modulate_kernel": cfg.enable_modulate_kernel}  # run-time switches: the flags decide
    keywords = {**MODEL_PRESETS[cfg.model], **from_file, **derived, **kernels}
    try:
        config = STDiTConfig.from_dict(keywords)
    except ValueError as e:
        raise ValueError(f"{e} (--model / --model_config)") from None
    latent_size = derived["input_size"]
    for n, p, flag in zip(latent_size, config.patch_size, ("--num_frames", "--image_size H", "--image_size W")):
        if n % p:
            raise ValueError(f"{flag} gives a latent size of {n}, not divisible by the patch size {p}")
    return STDiT(config)
