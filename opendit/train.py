"""Train or fine-tune STDiT on a CSV of clips and captions -- alone or under torchrun, on one node or many.

    opendit train --data_path data.csv --model_pretrained_path OpenSora-v1-HQ-16x512x512.pth \
        --text_pretrained_path ./pretrained_models/t5_ckpts --vae_pretrained_path ./sd-vae-ft-ema \
        --num_frames 16 --image_size 512 512 --batch_size 2 --mixed_precision bf16 --grad_checkpoint

    torchrun --standalone --nproc_per_node 8 -m opendit train ...                      # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint node0:29500 -m opendit train ...                               # on each node (rank 0, 1)
    opendit launch --hostfile hosts.txt --nproc_per_node 8 -- train ...                # the same, over ssh

Flags are the original's (``scripts/opensora/train_opensora.py``), plus the ones marked "(new)". Outputs go
to ``--outputs/NNN-<model>/``: config.yaml (reusable with ``--config``), log.txt, metrics.jsonl, tensorboard/,
and checkpoints ``epoch{E}-global_step{S}/`` (see ``opendit.checkpoint``) that ``--load`` resumes exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from opendit.checkpoint import create_experiment_dir, load_train_state, resolve_load_path, save_train_state
from opendit.config import ConfigError, parse_config, save_yaml
from opendit.data.cache import CachedLatentDataset, open_for_training
from opendit.data.csvfile import DataError
from opendit.data.dataset import BadSampleTracker, StatefulDistributedSampler, VideoTextDataset, collate
from opendit.diffusion import IDDPM, LOSS_WEIGHTINGS, PREDICTION_TYPES
from opendit.ema import EMA
from opendit.models import MODEL_PRESETS, STDiT, STDiTConfig, load_checkpoint
from opendit.parallel import (
    PRECISIONS,
    DynamicLossScaler,
    ParallelDims,
    autocast,
    grad_sync,
    init_distributed,
    parallelize,
)

logger = logging.getLogger("opendit")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, too many bad samples); the message says why."""


#################################################################################
#                                     Config                                    #
#################################################################################


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


#################################################################################
#                                  Setup helpers                                #
#################################################################################

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


def build_dataset(cfg: TrainConfig) -> VideoTextDataset | CachedLatentDataset:
    """The training set; the CSV is read and checked here, before anything heavy is loaded."""
    # ---- precomputed latents: a cache folder (`opendit prepare cache`, docs/data.md) as --data_path ----------
    if os.path.isdir(cfg.data_path):  # its index.json must agree with --num_frames/--image_size/...
        return open_for_training(cfg.data_path, cfg)
    # ----------------------------------------------------------------------------------------------------------
    return VideoTextDataset(cfg.data_path, num_frames=cfg.num_frames, frame_interval=cfg.frame_interval,
                            image_size=tuple(cfg.image_size), seed=cfg.global_seed)


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO; the other ranks only errors (they would repeat rank 0's messages)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")  # if unset
    logger.setLevel(logging.INFO if is_main else logging.ERROR)


class RunLog:
    """Rank 0's records of a run: log.txt, metrics.jsonl and TensorBoard scalars (no-ops on other ranks)."""

    def __init__(self, experiment_dir: Path | None) -> None:
        self.file_handler = self.writer = self.metrics = None
        if experiment_dir is None:
            return
        self.file_handler = logging.FileHandler(experiment_dir / "log.txt")
        self.file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s"))
        logger.addHandler(self.file_handler)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(experiment_dir / "tensorboard"))
        self.metrics = open(experiment_dir / "metrics.jsonl", "a")

    def log(self, record: dict) -> None:
        if self.metrics is None:
            return
        # NaN/inf are not JSON: a step without a finite value records null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key in ("loss", "lr", "grad_norm", "samples_per_s"):
            if record.get(key) is not None and math.isfinite(record[key]):
                self.writer.add_scalar(key, record[key], record["step"])

    def write_traceback(self) -> None:
        """The traceback of the error that ends the run goes to log.txt only (the console gets one line)."""
        if self.file_handler is not None:
            import traceback

            self.file_handler.stream.write(traceback.format_exc())
            self.file_handler.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.writer.close()
            logger.removeHandler(self.file_handler)
            self.file_handler.close()


def per_sample_noise(indices: list[int], epoch: int, seed: int, shape: tuple, num_timesteps: int,
                     device: torch.device, timestep_range: tuple[int, int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion timestep (B,) and noise (B, *shape) of each sample, drawn from a generator seeded by
    (seed, epoch, dataset index): a sample gets the same noise whichever rank trains it, so runs on any number
    of processes -- and resumed runs -- see the same training targets. ``timestep_range`` (LO, HI) limits t
    to LO..HI."""
    low, high = timestep_range if timestep_range is not None else (0, num_timesteps - 1)
    t = torch.empty(len(indices), dtype=torch.long, device=device)
    noise = torch.empty(len(indices), *shape, device=device)
    for i, index in enumerate(indices):
        g = torch.Generator(device).manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + index + 1)
        t[i] = torch.randint(low, high + 1, (1,), generator=g, device=device)[0]
        noise[i] = torch.randn(shape, generator=g, device=device)
    return t, noise


def model_inputs(batch: dict, dataset, vae, text_encoder, cfg: TrainConfig, epoch: int,  # noqa: ANN001
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], float]:
    """One micro-batch as the model takes it: latents x (B, C, T, h, w) fp32, text states y (B, 1, L, D), mask
    (B, L), the samples' dataset indices (they key the noise) and the weight of the batch in the loss."""
    if isinstance(dataset, CachedLatentDataset):  # a latent drawn from the stored posterior (no bad samples left)
        x, y, mask = dataset.sample_latents(batch, epoch, device)
        return x, y, mask, batch["index"].tolist(), 1.0
    if len(batch["index"]) == 0:
        # Every rank must run forward and backward (FSDP/DDP collectives), so a rank whose samples were all bad
        # trains on a blank clip with weight 0.
        video, texts, indices, weight = torch.zeros(1, 3, cfg.num_frames, *cfg.image_size), [""], [0], 0.0
    else:
        video, texts, indices, weight = batch["video"], batch["text"], batch["index"].tolist(), 1.0
    with torch.no_grad():
        x = vae.encode(video.to(device, getattr(vae, "dtype", torch.float32), non_blocking=True))  # micro-batched
        text = text_encoder.encode(texts)
    # Clones: the encoders run under inference_mode, whose tensors autograd may not save for the backward.
    return x.float().clone(), text["y"].float().clone(), text["mask"].clone(), indices, weight


def synced_bad_samples(batch: dict, tracker: BadSampleTracker, group: dist.ProcessGroup,
                       device: torch.device) -> int:
    """Count good samples over the data-parallel ranks, report bad ones; returns the global good count.

    Every rank feeds the tracker the same global numbers, so all of them stop together when there are too many
    bad samples (a rank stopping alone would leave the others waiting in a collective forever).
    """
    counts = torch.tensor([len(batch["index"]), len(batch["bad"])], dtype=torch.long, device=device)  # NCCL: on GPU
    dist.all_reduce(counts, group=group)
    num_good, num_bad = counts.tolist()
    messages = list(batch["bad"])
    if num_bad and dist.get_world_size(group) > 1:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, messages, group=group)
        messages = [m for ms in gathered for m in ms]
    try:
        tracker.update(num_good, messages)
    except RuntimeError as e:
        raise TrainingError(str(e)) from None
    return num_good


def time_is_up(deadline: float, device: torch.device) -> bool:
    """Whether any rank has passed `deadline` (time.time()): all ranks then stop after the same step, since
    clocks and speeds differ and a rank stopping alone would hang the others."""
    up = time.time() >= deadline
    if dist.get_world_size() == 1:
        return up  # no device tensor, no sync
    flag = torch.tensor([float(up)], device=device)  # NCCL: on the GPU
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


#################################################################################
#                                      Train                                    #
#################################################################################


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the experiment folder."""
    # ---- processes, devices, precision ------------------------------------------------------------------------
    di = init_distributed()
    try:
        return _train(cfg, di.rank, di.device)
    finally:
        if di.created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, device: torch.device) -> Path:
    is_main = rank == 0
    setup_logging(is_main)
    dims = ParallelDims.for_world(dist.get_world_size(), cfg.sequence_parallel_size, cfg.sequence_parallel_type)
    mesh = dims.build_mesh(device.type)
    dp_group, dp_rank = mesh["dp"].get_group(), mesh["dp"].get_local_rank()
    dtype = PRECISIONS[cfg.mixed_precision]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # ---- data: the CSV is checked before anything heavy loads -------------------------------------------------
    dataset = build_dataset(cfg)
    cached = isinstance(dataset, CachedLatentDataset)  # latents + text states precomputed: no encoders to run
    sampler = StatefulDistributedSampler(len(dataset), num_replicas=dims.dp, rank=dp_rank, shuffle=True,
                                         seed=cfg.global_seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=dataset.collate if cached else collate, drop_last=True,
                        pin_memory=device.type == "cuda",
                        # its own generator: creating an iterator must not consume the global RNG (exact resume)
                        generator=torch.Generator().manual_seed(cfg.global_seed))
    global_batch = cfg.batch_size * cfg.grad_accum * dims.dp
    if len(dataset) < global_batch:
        raise DataError(f"{cfg.data_path}: {len(dataset)} clips, fewer than one step's {global_batch} "
                        f"(--batch_size x --grad_accum x {dims.dp} data-parallel processes)")
    load_path = resolve_load_path(cfg.load, cfg.outputs) if cfg.load else None  # before our folder exists
    run_name = Path(cfg.model_config).stem if cfg.model_config else cfg.model  # a custom size is not the preset
    experiment_dir = create_experiment_dir(cfg.outputs, run_name)
    run_log = RunLog(experiment_dir if is_main else None)
    try:
        if is_main:
            save_yaml(cfg, str(experiment_dir / "config.yaml"))
            logger.info(f"experiment folder {experiment_dir}; {len(dataset):,} clips from {cfg.data_path}; "
                        f"{dims.dp} data-parallel x {dims.sp} sequence-parallel processes on {device.type}")

        # ---- frozen encoders and the model ------------------------------------------------------------------
        from opendit.encoders import load_text_encoder, load_vae

        if cached:  # only their sizes are needed, to build the model
            vae = text_encoder = dataset.encoder_sizes
        else:
            vae = load_vae(cfg.vae_pretrained_path, dtype=dtype if device.type == "cuda" else torch.float32,
                           device=device)
            text_encoder = load_text_encoder(
                cfg.text_pretrained_path, model_max_length=cfg.text_max_length, device=device,
                dtype=torch.bfloat16 if device.type == "cuda" and dtype != torch.float32 else torch.float32,
                speedup=cfg.text_speedup)
        torch.manual_seed(cfg.global_seed)  # the same initial weights on every rank
        model = build_stdit(cfg, vae, text_encoder)
        if cfg.model_pretrained_path:
            # logs what loaded; errors on a mismatch
            load_checkpoint(model, cfg.model_pretrained_path, skip=cfg.model_pretrained_skip or ())
        if is_main:
            (experiment_dir / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
            n_params = sum(p.numel() for p in model.parameters())
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(f"{run_name}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
                        f"latent size {model.config.input_size}")
        learn_sigma = model.config.pred_sigma  # a model without variance channels trains on the MSE alone
        model = parallelize(model, dims, mesh, cfg.plugin, device, dtype, cfg.grad_checkpoint, cfg.compile)
        params = [p for p in model.parameters() if p.requires_grad]
        # weight decay 0 as the original; the fused CUDA kernel updates all (sharded) parameters in a few launches
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
        ema = EMA(model, cfg.ema_decay)
        scaler = DynamicLossScaler(enabled=dtype == torch.float16)
        diffusion = IDDPM(timestep_respacing="", loss_weighting=cfg.loss_weighting,
                          loss_weight_max=cfg.loss_weight_max, prediction_type=cfg.prediction_type,
                          learn_sigma=learn_sigma)

        # ---- resume -----------------------------------------------------------------------------------------
        # Caption dropout and drop-path differ per data-parallel rank but not within a sequence-parallel group,
        # whose ranks must make the same draws for the same videos.
        torch.manual_seed(cfg.global_seed + dp_rank)
        start_epoch, global_step = 0, 0
        if load_path is not None:
            states = load_train_state(load_path, model, optimizer, ema, scaler, device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr  # the flag wins over the checkpoint's learning rate
            sampler.load_state_dict(states["sampler"])
            start_epoch, global_step = states["epoch"], states["global_step"]
            logger.info(f"resumed from {load_path}: epoch {start_epoch}, global step {global_step}")

        # ---- the loop ---------------------------------------------------------------------------------------
        model.train()  # enables caption dropout, which classifier-free guidance needs
        tracker = BadSampleTracker(cfg.max_bad_fraction)
        max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
        deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
        out_of_time = False
        nonfinite_in_a_row, last_saved, window = 0, global_step, dict(loss=0.0, steps=0, samples=0, t=time.time())
        for epoch in range(start_epoch, cfg.epochs):
            if global_step >= max_steps:
                break
            sampler.set_epoch(epoch)  # keeps a resumed epoch's start index
            dataset.set_epoch(epoch)
            first_step = sampler.start_index // global_batch
            steps = len(sampler) // (cfg.batch_size * cfg.grad_accum)
            if steps == 0:
                continue
            batches = iter(loader)
            pbar = tqdm(total=first_step + steps, initial=first_step, desc=f"epoch {epoch}", disable=not is_main,
                        dynamic_ncols=True)
            for step in range(first_step, first_step + steps):
                loss_sum, step_good = torch.zeros((), device=device), 0
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    sampler.advance(cfg.batch_size * dims.dp)
                    num_good = synced_bad_samples(batch, tracker, dp_group, device)
                    step_good += num_good
                    x, y, mask, indices, weight = model_inputs(batch, dataset, vae, text_encoder, cfg, epoch, device)
                    t, noise = per_sample_noise(indices, epoch, cfg.global_seed, tuple(x.shape[1:]),
                                                diffusion.num_timesteps, device, cfg.timestep_range)
                    with grad_sync(model, enabled=micro == cfg.grad_accum - 1), autocast(model, device, dtype):
                        losses = diffusion.training_losses(model, x, t, dict(y=y, mask=mask), noise)["loss"]  # (B,)
                        # Sum over this rank / good samples of all ranks, times the data-parallel size that FSDP/DDP
                        # average over: the gradient of the global mean loss however the samples were split (SP
                        # ranks of a group compute the same loss and their average is already exact).
                        loss = weight * losses.sum() / max(num_good, 1) * dims.dp / cfg.grad_accum
                        scaler.scale_loss(loss).backward()
                    loss_sum += weight * losses.detach().sum() / max(num_good, 1) / cfg.grad_accum

                # ---- update: skipped on every rank when the loss or the gradient is not finite -------------------
                dist.all_reduce(loss_sum, group=dp_group)  # the global mean loss of the step
                scaler.unscale_(params)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()  # the norm over all shards, the same on every rank
                loss_value, norm_value = torch.stack([loss_sum, grad_norm.float()]).tolist()
                finite = math.isfinite(loss_value) and math.isfinite(norm_value)
                if finite and step_good > 0:  # (no good sample anywhere: nothing to learn from)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
                    optimizer.step()
                    ema.update(model)
                scaler.update(found_inf=not finite)
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                pbar.update(1)

                if not math.isfinite(loss_value):
                    nonfinite_in_a_row += 1
                    logger.warning(f"step {global_step}: loss is {loss_value}, update skipped "
                                   f"({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        raise TrainingError(
                            f"{nonfinite_in_a_row} consecutive steps with a non-finite loss (step {global_step}): "
                            f"stopping. Lower --lr, use --mixed_precision bf16, or resume from an earlier "
                            f"checkpoint with --load")
                elif step_good > 0:
                    nonfinite_in_a_row = 0
                    window["loss"] += loss_value
                    window["steps"] += 1
                window["samples"] += step_good

                # ---- log ----------------------------------------------------------------------------------------
                if global_step % cfg.log_every == 0:
                    elapsed = time.time() - window["t"]
                    record = dict(step=global_step, epoch=epoch,
                                  loss=window["loss"] / window["steps"] if window["steps"] else float("nan"),
                                  lr=optimizer.param_groups[0]["lr"], grad_norm=norm_value,
                                  samples_per_s=window["samples"] / max(elapsed, 1e-9))
                    run_log.log(record)
                    pbar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}",
                                     samples_s=f"{record['samples_per_s']:.1f}")
                    window = dict(loss=0.0, steps=0, samples=0, t=time.time())

                # ---- checkpoint ---------------------------------------------------------------------------------
                if deadline != math.inf:
                    out_of_time = time_is_up(deadline, device)
                done = (global_step >= max_steps or out_of_time
                        or (epoch == cfg.epochs - 1 and step == first_step + steps - 1))
                if cfg.ckpt_every > 0 and (global_step % cfg.ckpt_every == 0 or done) and last_saved != global_step:
                    running = dict(epoch=epoch, step=step + 1, global_step=global_step,
                                   sample_start_index=sampler.state_dict()["start_index"],
                                   batch_size=cfg.batch_size, global_batch_size=global_batch,
                                   sampler=sampler.state_dict())
                    path = save_train_state(experiment_dir, model, optimizer, ema, scaler, running, device)
                    last_saved = global_step
                    logger.info(f"saved checkpoint {path}")
                if global_step >= max_steps or out_of_time:
                    break
            pbar.close()
            if out_of_time:
                logger.info(f"--max_minutes {cfg.max_minutes} reached at step {global_step}")
                break
        logger.info(f"done: {global_step} steps; outputs in {experiment_dir}")
        return experiment_dir
    except Exception:
        run_log.write_traceback()
        raise
    finally:
        run_log.close()


USER_ERRORS = (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """``opendit train``: returns the exit code (1 with a one-line message for user errors)."""
    cfg = parse_config(TrainConfig, argv, prog="opendit train", description=__doc__.split("\n\n")[0])
    try:
        train(cfg)
    except USER_ERRORS as e:
        rank = int(os.environ.get("RANK", 0))
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{prefix}opendit train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
